"""The README's shell commands, run as written: each command of a ```sh block either runs here
(against Cog's real server with the tiny weights, curl included) or is listed below with why not."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# Commands that cannot run on this machine or in this suite, by how they start, and why.
NOT_RUN_HERE = {
    "docker ": "needs a Docker engine and a GPU",
    "cog ": "needs a Docker engine",
    "COGLET_WHEEL=pypi:0.23.1 cog build": "needs a Docker engine",
    "script/test": "runs this suite (CI runs it as .ci/run)",
    "kubectl ": "needs a Kubernetes cluster: tests/test_deploy.py validates each manifest against Kubernetes' "
                "published schemas and runs its probe commands against Cog's real server",
    "script/download-weights": "needs the hub: tests/test_weights.py runs it against a stand-in hub with the real layout",
    "script/bake-compiled": "needs the real checkpoint and a GPU of the deployment's type: tests/test_artifact.py runs "
                            "it on the tiny weights on the CPU (--weights, --shapes 64x64, --device cpu)",
}


def sh_commands(readme: str) -> list[list[str]]:
    """The commands of each ```sh block, one string per command: lines joined across a trailing
    backslash, an open quote and a here-document, as bash reads them."""
    blocks = re.findall(r"^```sh\n(.*?)^```", readme, flags=re.S | re.M)
    parsed = []
    for block in blocks:
        commands, current, heredoc = [], "", None
        for line in block.splitlines():
            current = f"{current}\n{line}" if current else line
            if heredoc:
                if line == heredoc:
                    heredoc = None
                    commands.append(current)
                    current = ""
                continue
            if marker := re.search(r"<<-?'?(\w+)'?", line):
                heredoc = marker.group(1)
                continue
            if current.endswith("\\") or _open_quote(current):
                continue
            commands.append(current)
            current = ""
        assert not current, f"unterminated command in the README: {current!r}"
        parsed.append(commands)
    return parsed


def _open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
        return False
    except ValueError:
        return True


def _runs_here(command: str) -> bool:
    return not any(command.startswith(prefix) for prefix in NOT_RUN_HERE)


def test_every_readme_command_is_run_here_or_says_why_not():
    blocks = sh_commands((ROOT / "README.md").read_text())
    commands = [command for block in blocks for command in block]
    assert any(command.startswith("curl") for command in commands)
    runnable = [command for command in commands if _runs_here(command)]
    known = ("script/predict", "curl ", "cat > request.json", "python3 -c ")
    assert all(command.startswith(known) for command in runnable), [c for c in runnable if not c.startswith(known)]


def test_the_curl_example_works_as_written(server, tmp_path):
    """The docker run + curl block, against the local server instead of the container: every command
    but `docker run`, as written, with only localhost:5000 pointed at this server's port."""
    [block] = [block for block in sh_commands((ROOT / "README.md").read_text()) if any("curl" in c for c in block)]
    script = "\n".join(command for command in block if _runs_here(command))
    script = script.replace("localhost:5000", server.url.removeprefix("http://"))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '"status":"READY"' in result.stdout.replace(" ", "")
    assert "succeeded" in result.stdout.splitlines()[-1]
    response = json.loads((tmp_path / "response.json").read_text())
    assert response["status"] == "succeeded" and response["metrics"]["seed"] == 42
    with Image.open(tmp_path / "out-0.png") as output, Image.open(ROOT / "examples" / "chelsea.png") as photo:
        assert output.size == photo.size
    # What the old example did and Linux refuses: the photo's data URI is over 128 KB, too long for one argument.
    assert (tmp_path / "request.json").stat().st_size > 128 * 1024


def test_script_predict_works_as_written(tmp_path):
    """The README's first command on a fresh clone: offline it uses the tiny weights and says so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["script/predict"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if not (ROOT / "weights" / "model_index.json").is_file():
        assert "tiny random TEST weights" in result.stderr
    written = Path(result.stdout.strip().splitlines()[-1])
    assert written == ROOT / "outputs" / "out-0.png"
    with Image.open(written) as output, Image.open(ROOT / "examples" / "chelsea.png") as photo:
        assert output.size == photo.size
    assert json.loads((ROOT / "outputs" / "metrics.json").read_text())["seed"] == 42


def test_script_predict_refuses_a_request_over_cogs_body_limit_before_it_starts_anything(tmp_path):
    """A 4096x4096 photo and its mask as uncompressed TIFFs (117 MB, a third more as data URIs) are over what
    Cog's server takes in one request: script/predict says so, names the files and what to do, before it makes
    weights or starts a server."""
    image, mask = tmp_path / "photo.tif", tmp_path / "mask.tif"
    Image.new("RGBA", (4096, 4096)).save(image)  # Pillow writes TIFF uncompressed by default
    Image.new("RGB", (4096, 4096)).save(mask)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = ["script/predict", "--image", str(image), "--mask", str(mask), "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip()
    assert "over the 104,857,600 bytes (100 MiB) Cog's server accepts in one request body" in message
    assert f"image {image} ({image.stat().st_size:,} bytes) and mask {mask} ({mask.stat().st_size:,} bytes)" in message
    assert "-i image=https://" in message
    assert not out.exists()  # no server was started


def test_script_predict_names_a_missing_file(tmp_path):
    result = subprocess.run(["script/predict", "--image", str(tmp_path / "nope.png")], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"--image {tmp_path / 'nope.png'}: no such file" in result.stderr
