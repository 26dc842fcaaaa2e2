"""Virtual environments made of distributions another interpreter already has: each distribution's
top-level files linked into the new venv's site-packages (no copy, the same files, the same page cache)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path


def top_level_entries(dist: metadata.Distribution) -> set[Path]:
    """The paths, directly in the distribution's site directory, that its files live under."""
    site = Path(dist.locate_file(""))
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".data"):
            entries.add(site / first)
    return entries


def linked_venv(target: Path, dists: list[metadata.Distribution], with_pip: bool = False) -> tuple[Path, int]:
    """A new venv at `target` (emptied first) holding `dists` as links: its site-packages and the number of
    links made. Never let pip uninstall a linked distribution there: it would delete the files it links to."""
    options = [] if with_pip else ["--without-pip"]
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", *options, "--clear", str(target)],
                   check=True)
    site = Path(subprocess.run([str(target / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    linked = 0
    for dist in dists:
        for entry in sorted(top_level_entries(dist)):
            link = site / entry.name
            if entry.exists() and not link.exists():  # a namespace folder (nvidia/) shared by several: linked once
                link.symlink_to(entry)
                linked += 1
    return site, linked
