"""Compiled parts shipped with the weights (inpaint/fastpath/artifact.py, script/bake-compiled): built by
the real script on the tiny model, loaded at setup when trusted, refused otherwise with a reason."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inpaint import pipeline
from inpaint.fastpath import FastPath, artifact
from inpaint.weights import COMPILED, _reference_view, read_manifest, resolve_weights

from conftest import ROOT, Counting, run_pipeline
from https_server import tar_of

WAIT = 900  # seconds: three cold compiles of the tiny model on a 2-core CPU

# One pytest-xdist worker runs this file and test_compiled.py, in order: their compiles share the
# session's Inductor cache (conftest.inductor_cache), so test_compiled reuses the bake's kernels.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("inductor")]


@pytest.fixture(autouse=True)
def _no_inductor_cache_chosen(monkeypatch):
    """Each test starts as a fresh container does: no Inductor cache chosen (a FastPath points the variable
    at its own cache for the rest of the process), so a loaded artifact's kernels go into the test's cache."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


@pytest.fixture(scope="module")
def baked(tiny_weights, inductor_cache, tmp_path_factory):
    """A copy of the tiny checkpoint with compiled/ written by script/bake-compiled at 64x64, two outputs, on the CPU,
    and what the script printed."""
    folder = tmp_path_factory.mktemp("baked") / "weights"
    shutil.copytree(tiny_weights, folder)
    result = subprocess.run([sys.executable, ROOT / "script" / "bake-compiled", "--weights", folder, "--shapes", "64x64",
                             "--outputs", "2", "--device", "cpu"], capture_output=True, text=True, timeout=WAIT, cwd=ROOT,
                            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result.stdout


def _copy(baked, tmp_path) -> Path:
    folder = tmp_path / "weights"
    shutil.copytree(baked[0], folder)
    return folder


def _fast(tmp_path, folder, **artifact_options) -> FastPath:
    """The fast path as on a GPU (FastPath.for_device leaves it off on the CPU), with the artifact in `folder`."""
    return FastPath(compile="background", cache_dir=tmp_path / "cache", artifact=folder / COMPILED, **artifact_options)


def test_the_bake_writes_every_part_a_manifest_of_sha256s_and_prints_its_pin(baked):
    folder, printed = baked
    manifest_bytes = (folder / COMPILED / artifact.MANIFEST).read_bytes()
    pin = hashlib.sha256(manifest_bytes).hexdigest()
    assert f"INPAINT_COMPILED_MANIFEST_SHA256, needed when they ship in COG_WEIGHTS): {pin}" in printed
    assert "all compiled" in printed
    manifest = json.loads(manifest_bytes)
    assert manifest["format"] == 1 and manifest["machine"] == artifact.machine(torch.device("cpu"))
    shapes = {entry["part"]: json.loads(entry["key"])[0][0][0] for entry in manifest["parts"]}
    # two outputs at 64x64 (conftest.run_pipeline's, as test_compiled's compiles: they share Inductor's kernels):
    # the UNet sees 2 (guidance) x 2 x 9 x 8 x 8, the VAE decodes 1 x 4 x 8 x 8 at a time, encodes 1 x 3 x 64 x 64
    assert shapes == {"unet": [4, 9, 8, 8], "vae.decoder": [1, 4, 8, 8], "vae.encoder": [1, 3, 64, 64]}
    for name, entry in manifest["files"].items():
        data = (folder / COMPILED / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    assert any(name.startswith("inductor/") for name in manifest["files"])  # the kernels travel with the parts


def test_parts_baked_into_the_image_load_at_setup_and_the_first_prediction_is_compiled(baked, tmp_path, caplog):
    folder = _copy(baked, tmp_path)
    plain = run_pipeline(pipeline.load_pipeline(folder, torch.device("cpu"), torch.float32))
    fast = _fast(tmp_path, folder, artifact_trusted=True)
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        pipe = pipeline.load_pipeline(folder, torch.device("cpu"), torch.float32, fast)
        assert fast.load_shipped(WAIT, size=64)  # the size setup waits for: here the bake's
    assert "compiled parts shipped with the weights: 3" in caplog.text
    assert "setup took up the 3 shipped compiled parts at 64x64 in" in caplog.text and "background" not in caplog.text
    assert "not loaded as shipped" not in caplog.text
    assert [list(part.sources.values()) for part in fast.compiled_parts] == [["loaded"]] * 3  # nothing compiled
    counting = []
    for part in fast.compiled_parts:
        part.adopt()  # (as the first prediction would)
        (key,) = part.adopted
        part.adopted[key] = Counting(part.adopted[key])
        counting.append(part.adopted[key])
    first = run_pipeline(pipe, fast)
    assert [count.calls for count in counting] == [4, 2, 1]  # every step compiled; each output decoded, one encode
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, first))
    assert [len(part.requested) for part in fast.compiled_parts] == [1, 1, 1]  # nothing more asked for
    fast.stop()


def test_setup_waits_only_for_the_parts_at_its_own_size_and_the_others_load_after_it(baked, tmp_path, caplog):
    """A bake holds every automatic size by default; setup waits for the parts at 512x512 alone, so READY does
    not wait for all of them to load. The bake here holds 64x64 only: setup waits for none, and they load after."""
    folder = _copy(baked, tmp_path)
    fast = _fast(tmp_path, folder, artifact_trusted=True)
    pipe = pipeline.load_pipeline(folder, torch.device("cpu"), torch.float32, fast)
    assert [fast.working_size(part, key) for part, key in fast.shipped] == [(64, 64)] * 3
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        assert fast.load_shipped(WAIT)
        assert "setup took up the 0 shipped compiled parts at 512x512" in caplog.text
        assert "the other 3 load in the background" in caplog.text
        assert [len(part.requested) for part in fast.compiled_parts] == [1, 1, 1]  # asked for, not waited for
        assert fast.wait(WAIT)
    assert [list(part.sources.values()) for part in fast.compiled_parts] == [["loaded"]] * 3
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        run_pipeline(pipe, fast)  # the next prediction takes them up
    assert caplog.text.count("this prediction uses the compiled") == 3
    fast.stop()


def test_unpinned_parts_that_came_in_a_cog_weights_tar_are_ignored_and_the_log_says_why(
        baked, tmp_path, https, tiny_settings, caplog, monkeypatch):
    https.routes["/weights.tar.gz"] = (200, {}, tar_of(baked[0]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # a fresh container's cache: unpacked here
    folder = resolve_weights(f"{https.url}/weights.tar.gz", tiny_settings)
    assert (folder / COMPILED / artifact.MANIFEST).is_file()  # it came with the tar
    fast = _fast(tmp_path, folder)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath"):
        pipeline.load_pipeline(folder, torch.device("cpu"), torch.float32, fast)
    assert not fast.shipped and fast.load_shipped()
    assert "not used: it did not come with the image and its manifest is not pinned" in caplog.text
    assert "set INPAINT_COMPILED_MANIFEST_SHA256" in caplog.text and "compile in the background instead" in caplog.text
    assert not list((tmp_path / "cache").glob("*.aot"))  # nothing of it copied, so nothing of it can be unpickled
    fast.stop()


def test_pinned_parts_from_cog_weights_are_used_and_a_wrong_pin_is_refused(baked, tmp_path, caplog):
    folder = _copy(baked, tmp_path)
    pin = hashlib.sha256((folder / COMPILED / artifact.MANIFEST).read_bytes()).hexdigest()
    fast = FastPath(compile="background", cache_dir=tmp_path / "pinned", artifact=folder / COMPILED, artifact_pin=pin)
    pipeline.load_pipeline(folder, torch.device("cpu"), torch.float32, fast)
    assert len(fast.shipped) == 3 and sorted(path.suffix for path in (tmp_path / "pinned").glob("unet-*")) == [".aot", ".hmac"]
    fast.stop()
    wrong = FastPath(compile="background", cache_dir=tmp_path / "wrong", artifact=folder / COMPILED, artifact_trusted=True,
                     artifact_pin="0" * 64)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath"):
        pipeline.load_pipeline(folder, torch.device("cpu"), torch.float32, wrong)
    assert not wrong.shipped and f"its manifest's sha256 is {pin}, not the INPAINT_COMPILED_MANIFEST_SHA256" in caplog.text
    wrong.stop()


def _manifest(folder: Path) -> dict:
    return json.loads((folder / COMPILED / artifact.MANIFEST).read_text())


def _write(folder: Path, manifest: dict) -> None:
    (folder / COMPILED / artifact.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("harm, reason", [
    ("a changed part", "does not match its sha256 in the manifest"),
    ("a part cut short", "bytes, not as its manifest lists"),
    ("a forged path", "outside the artifact"),
    ("a link", "is missing or not a regular file"),
    ("another GPU", 'it was built for {"capability": [9, 0], "diffusers"'),
    ("not a manifest", "is not a format-1 manifest of compiled parts"),
    ("a part it does not hold", "its manifest lists a part it does not hold"),
])
def test_a_harmed_artifact_is_refused_before_anything_is_copied(baked, tmp_path, harm, reason):
    folder = _copy(baked, tmp_path)
    manifest = _manifest(folder)
    unet = next(entry["file"] for entry in manifest["parts"] if entry["part"] == "unet")
    part = folder / COMPILED / unet
    if harm == "a changed part":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 1
        part.write_bytes(bytes(data))
    elif harm == "a part cut short":
        part.write_bytes(part.read_bytes()[:-1])
    elif harm == "a forged path":
        manifest["files"]["../../escape.aot"] = manifest["files"][unet]
        _write(folder, manifest)
    elif harm == "a link":
        target = tmp_path / "elsewhere.aot"
        shutil.move(part, target)
        part.symlink_to(target)
    elif harm == "another GPU":
        manifest["machine"] = {**manifest["machine"], "gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}
        _write(folder, manifest)
    elif harm == "not a manifest":
        (folder / COMPILED / artifact.MANIFEST).write_text('{"format": 1, "files": []}')
    elif harm == "a part it does not hold":
        manifest["parts"].append({"part": "text_encoder", "key": manifest["parts"][0]["key"], "file": unet})
        _write(folder, manifest)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    with pytest.raises(artifact.ArtifactRefused, match=reason.replace("[", r"\[").replace("]", r"\]")):
        artifact.install(folder / COMPILED, cache, None, torch.device("cpu"), trusted=True)
    assert not list(cache.iterdir())


def test_the_view_of_a_checkpoint_links_its_compiled_parts(baked, tmp_path):
    folder = _copy(baked, tmp_path)
    own = read_manifest(folder, pin=hashlib.sha256((folder / "weights-sha256.json").read_bytes()).hexdigest())
    weights_only = {name: entry for name, entry in own.items() if name.endswith(".safetensors")}  # as the published ones
    view = _reference_view(folder, weights_only)
    try:
        assert (view / COMPILED).resolve() == (folder / COMPILED).resolve()
    finally:
        shutil.rmtree(view)


def test_the_bake_refuses_a_size_that_is_not_a_working_size():
    result = subprocess.run([sys.executable, ROOT / "script" / "bake-compiled", "--shapes", "500x512"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "500x512 is not a working size: sides are multiples of 64 from 64 to 1024" in result.stderr
