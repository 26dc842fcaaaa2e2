"""Re-run the calling script inside .venv, building it first with script/setup-env if needed."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def ensure_venv() -> None:
    """Make sure this process runs in .venv with the repo root importable."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        return
    subprocess.run([str(ROOT / "script" / "setup-env")], check=True)
    script = Path(sys.argv[0]).resolve()
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), str(script), *sys.argv[1:]])
