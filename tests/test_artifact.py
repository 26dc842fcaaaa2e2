"""Compiled parts shipped with the weights (inpaint/fastpath/artifact.py, script/bake-compiled): built by
the real script on the tiny model, loaded at setup when trusted, refused otherwise with a reason; and the
trust gate on crafted artifacts (forged manifests, links, names, keys), which needs no bake."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from inpaint import cachetrust, pipeline
from inpaint.fastpath import FastPath, ShapeKey, artifact
from inpaint.fastpath.compiler import CompiledPart, Compiler
from inpaint.weights import COMPILED, _reference_view, read_manifest, resolve_weights, sha256_file

from conftest import ROOT, Counting, run_pipeline, tiny_unet
from https_server import tar_of

WAIT = 900  # seconds: three cold compiles of the tiny model on a 2-core CPU



def _of_the_bake(test):
    """A test of a real bake: slow, and in the one pytest-xdist worker that runs test_compiled.py too, in
    order: their compiles share the session's Inductor cache (conftest.inductor_cache), so test_compiled
    reuses the bake's kernels."""
    return pytest.mark.slow(pytest.mark.xdist_group("inductor")(test))


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


@_of_the_bake
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


@_of_the_bake
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


@_of_the_bake
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


@_of_the_bake
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


@_of_the_bake
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


@_of_the_bake
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


# ---------------------------------------------------------------- the trust gate, on crafted artifacts
# Built in the layout artifact.py's docstring gives (manifest.json, *.aot, inductor/...), with bytes that are
# no compiled part: reading and installing an artifact never unpickles it, so these need no bake.

CPU = torch.device("cpu")
KEY = ShapeKey.of(torch.zeros(2, 9, 8, 8), torch.tensor(500), torch.zeros(2, 77, 32))
PART, KERNEL, KERNEL_JSON = "unet-0123456789abcdef0123.aot", "inductor/ab/cd/kernel.py", "inductor/ab/cd/kernel.json"


def _crafted(tmp_path, *, manifest: dict | None = None, files: dict[str, bytes] | None = None) -> tuple[Path, str]:
    """An artifact folder holding `files` (a UNet part and one kernel unless given) listed with their sha256
    and size in a format-1 manifest built for this machine, changed by `manifest`'s keys; and its pin."""
    folder = tmp_path / "weights" / COMPILED
    files = {PART: b"not a pickle: never loaded here", KERNEL: b"# a kernel\n", KERNEL_JSON: b"{}"} if files is None else files
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    listed = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in files.items()}
    document = {"format": 1, "machine": artifact.machine(CPU), "files": listed,
                "parts": [{"part": "unet", "key": KEY.to_json(), "file": PART}], **(manifest or {})}
    data = json.dumps(document).encode()
    (folder / artifact.MANIFEST).write_bytes(data)
    return folder, hashlib.sha256(data).hexdigest()


def _cache(tmp_path) -> tuple[Path, cachetrust.Seal]:
    cache = cachetrust.private_folder(tmp_path / "cache")
    return cache, cachetrust.Seal(cache)


def _refused(folder: Path, tmp_path, message: str, **trust) -> None:
    """install refuses the artifact with exactly `message`, and has put nothing in the cache."""
    cache, seal = _cache(tmp_path)
    before = sorted(cache.iterdir())  # the seal's own key
    with pytest.raises(artifact.ArtifactRefused) as refused:
        artifact.install(folder, cache, seal, CPU, **{"trusted": True, **trust})
    assert str(refused.value) == message
    assert sorted(cache.iterdir()) == before


def test_a_trusted_artifact_is_copied_into_the_cache_with_its_kernels_each_file_private_and_sealed(tmp_path):
    folder, _ = _crafted(tmp_path)
    cache, seal = _cache(tmp_path)
    assert artifact.install(folder, cache, seal, CPU, trusted=True) == [("unet", KEY)]
    part, kernel = cache / PART, cache / KERNEL
    assert seal.read(part) == (folder / PART).read_bytes()  # sealed as this deployment's own
    assert [(cache / name).read_bytes() for name in (KERNEL, KERNEL_JSON)] == [b"# a kernel\n", b"{}"]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")  # where Inductor will look for them
    seal.check_tree(cache / "inductor")
    assert [oct(path.stat().st_mode & 0o777) for path in (part, kernel, kernel.parent)] == ["0o600", "0o600", "0o700"]


def test_a_later_start_keeps_the_sealed_kernels_it_finds_and_adds_the_artifacts(tmp_path, monkeypatch):
    """The cache outlives a container (a volume): a later start checks the Inductor cache it finds against its
    seal, keeps it, and copies the artifact's kernels in beside what the container's compiles added."""
    folder, _ = _crafted(tmp_path)
    cache, seal = _cache(tmp_path)
    artifact.install(folder, cache, seal, CPU, trusted=True)
    (cache / "inductor" / "built-here.py").write_bytes(b"# compiled by this deployment")
    seal.seal_tree(cache / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # a new process
    assert artifact.install(folder, cache, cachetrust.Seal(cache), CPU, trusted=True) == [("unet", KEY)]
    assert (cache / "inductor" / "built-here.py").is_file() and (cache / KERNEL).is_file()
    assert not list(cache.glob("*.rejected-*"))  # nothing moved aside (cachetrust.move_aside)
    cachetrust.Seal(cache).check_tree(cache / "inductor")


def test_the_machine_a_manifest_records_is_its_documented_fields():
    import diffusers

    assert artifact.machine(CPU) == {"gpu": "cpu", "capability": None, "torch": torch.__version__,
                                     "diffusers": diffusers.__version__}


def test_the_kernels_are_left_out_when_the_deployment_chose_its_own_inductor_cache(tmp_path, monkeypatch, caplog):
    folder, _ = _crafted(tmp_path)
    cache, seal = _cache(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        assert artifact.install(folder, cache, seal, CPU, trusted=True) == [("unet", KEY)]
    assert (cache / PART).is_file() and not (cache / "inductor").exists() and not (tmp_path / "chosen").exists()
    assert ("the artifact's Inductor kernels are not copied: this deployment chose its own TORCHINDUCTOR_CACHE_DIR "
            "(a loaded part builds what it misses there)") in caplog.text


@pytest.mark.parametrize("how", ["pinned", "pinned as written by hand", "baked into the image, and pinned"])
def test_a_pinned_artifact_is_used(tmp_path, how):
    folder, pin = _crafted(tmp_path)
    pin = f"  {pin.upper()}\n" if how == "pinned as written by hand" else pin
    cache, seal = _cache(tmp_path)
    assert artifact.install(folder, cache, seal, CPU, trusted=how.startswith("baked"), pin=pin) == [("unet", KEY)]


def test_an_artifact_neither_baked_in_nor_pinned_is_refused(tmp_path):
    folder, _ = _crafted(tmp_path)
    _refused(folder, tmp_path, "it did not come with the image and its manifest is not pinned (compiled parts are code: "
             "loading one runs it); to use it, set INPAINT_COMPILED_MANIFEST_SHA256 to the sha256 script/bake-compiled "
             "printed for it", trusted=False)


def test_a_pin_is_checked_even_for_an_artifact_baked_into_the_image(tmp_path):
    folder, pin = _crafted(tmp_path)
    _refused(folder, tmp_path, f"its manifest's sha256 is {pin}, not the INPAINT_COMPILED_MANIFEST_SHA256 this "
             "deployment set", pin=pin[:-1] + ("0" if pin[-1] != "0" else "1"))


@pytest.mark.parametrize("harm", ["missing", "a link to a good one", "a folder"])
def test_a_manifest_that_is_not_a_regular_file_is_refused(tmp_path, harm):
    folder, _ = _crafted(tmp_path)
    manifest = folder / artifact.MANIFEST
    if harm == "missing":
        manifest.unlink()
    elif harm == "a link to a good one":
        manifest.rename(tmp_path / "elsewhere.json")
        manifest.symlink_to(tmp_path / "elsewhere.json")
    else:
        manifest.unlink()
        manifest.mkdir()
    _refused(folder, tmp_path, "manifest.json is missing or not a regular file")


def test_a_manifest_over_its_size_limit_is_refused_unread_and_one_at_the_limit_is_read(tmp_path):
    folder, _ = _crafted(tmp_path)
    manifest = folder / artifact.MANIFEST
    data = manifest.read_bytes()
    manifest.write_bytes(data + b" " * (artifact.MAX_MANIFEST_BYTES - len(data)))  # JSON may end in blanks
    pin = hashlib.sha256(manifest.read_bytes()).hexdigest()
    cache, seal = _cache(tmp_path)
    assert artifact.install(folder, cache, seal, CPU, trusted=False, pin=pin) == [("unet", KEY)]
    manifest.write_bytes(manifest.read_bytes() + b" ")
    _refused(folder, tmp_path / "over", "manifest.json is larger than 16,777,216 bytes")


@pytest.mark.parametrize("text", [
    b"not json", b"\xff\xfe{}", b"[]", b"[" * 100_000 + b"]" * 100_000, b'{"format": 2, "files": {}, "parts": [], "machine": {}}',
    b'{"format": 1, "files": [], "parts": [], "machine": {}}', b'{"format": 1, "files": {}, "parts": {}, "machine": {}}',
    b'{"format": 1, "files": {}, "parts": []}', b'{"files": {}, "parts": [], "machine": {}}',
], ids=["not JSON", "not UTF-8", "a list", "nested past the parser's depth", "another format", "files not a map",
        "parts not a list", "no machine", "no format"])
def test_a_manifest_not_in_the_format_is_refused(tmp_path, text):
    folder, _ = _crafted(tmp_path)
    (folder / artifact.MANIFEST).write_bytes(text)
    _refused(folder, tmp_path, "manifest.json is not a format-1 manifest of compiled parts")


@pytest.mark.parametrize("field, value", [("gpu", "NVIDIA H200"), ("capability", [9, 0]), ("torch", "2.10.0"),
                                          ("diffusers", "0.41.0")])
def test_an_artifact_built_for_another_machine_is_refused_with_both_machines_named(tmp_path, field, value):
    built_for = {**artifact.machine(CPU), field: value}
    folder, _ = _crafted(tmp_path, manifest={"machine": built_for})
    _refused(folder, tmp_path, f"it was built for {json.dumps(built_for, sort_keys=True)}; this machine is "
             f"{json.dumps(artifact.machine(CPU), sort_keys=True)} (run script/bake-compiled on this kind of GPU)")


@pytest.mark.parametrize("name, reason", [
    ("/etc/passwd", "outside the artifact"), ("../escape.aot", "outside the artifact"),
    ("inductor/../../escape.aot", "outside the artifact"), ("manifest.json", "outside the artifact"),
    ("", "that is not a plain relative path"), ("inductor\\..\\escape.aot", "that is not a plain relative path"),
    ("part\0.aot", "that is not a plain relative path"),
])
def test_a_forged_file_name_is_refused(tmp_path, name, reason):
    folder, _ = _crafted(tmp_path)
    manifest = json.loads((folder / artifact.MANIFEST).read_text())
    manifest["files"][name] = manifest["files"][PART]
    (folder / artifact.MANIFEST).write_text(json.dumps(manifest))
    _refused(folder, tmp_path, f"its manifest names a file {name!r} {reason}")


@pytest.mark.parametrize("harm", ["missing", "a link", "in a linked folder", "a folder"])
def test_a_listed_file_that_is_not_a_regular_file_inside_the_artifact_is_refused(tmp_path, harm):
    folder, _ = _crafted(tmp_path)
    name = KERNEL if harm == "in a linked folder" else PART
    target = folder / name
    if harm == "missing":
        target.unlink()
    elif harm == "a link":
        target.rename(tmp_path / "elsewhere.aot")
        target.symlink_to(tmp_path / "elsewhere.aot")
    elif harm == "in a linked folder":  # the same bytes, reached through a link out of the artifact
        (folder / "inductor").rename(tmp_path / "outside")
        (folder / "inductor").symlink_to(tmp_path / "outside")
    else:
        target.unlink()
        target.mkdir()
    _refused(folder, tmp_path, f"{name} is missing or not a regular file")


@pytest.mark.parametrize("harm", ["one byte longer", "one byte changed", "no size listed", "no sha256 listed", "not a map"])
def test_a_file_unlike_its_manifest_entry_is_refused(tmp_path, harm):
    files = {PART: b"part bytes", KERNEL: b"kernel"}
    folder, _ = _crafted(tmp_path, files=files)
    manifest = json.loads((folder / artifact.MANIFEST).read_text())
    if harm == "one byte longer":
        (folder / PART).write_bytes(files[PART] + b"!")
    elif harm == "one byte changed":
        (folder / PART).write_bytes(b"Part bytes")
    elif harm == "not a map":
        manifest["files"][PART] = [manifest["files"][PART]["sha256"], len(files[PART])]
    else:
        del manifest["files"][PART]["size" if harm == "no size listed" else "sha256"]
    (folder / artifact.MANIFEST).write_text(json.dumps(manifest))
    size = len(files[PART]) + (harm == "one byte longer")
    reason = "does not match its sha256 in the manifest" if harm in ("one byte changed", "no sha256 listed") else \
        f"is {size:,} bytes, not as its manifest lists"
    _refused(folder, tmp_path, f"{PART} {reason}")


@pytest.mark.parametrize("entry, message", [
    ("a list", "its manifest lists a part it does not hold: ['unet']"),
    ({"part": "text_encoder"}, "its manifest lists a part it does not hold: {{'part': 'text_encoder', 'key': {key!r}, 'file': {file!r}}}"),
    ({"part": ["unet"]}, "its manifest lists a part it does not hold: {{'part': ['unet'], 'key': {key!r}, 'file': {file!r}}}"),
    ({"file": "unlisted.aot"}, "its manifest lists a part it does not hold: {{'part': 'unet', 'key': {key!r}, 'file': 'unlisted.aot'}}"),
    ({"file": KERNEL}, "its manifest lists a part file 'inductor/ab/cd/kernel.py', not a compiled part's name (NAME.aot, at the "
                       "artifact's top level)"),
    ({"file": "kernel.py"}, "its manifest lists a part file 'kernel.py', not a compiled part's name (NAME.aot, at the "
                            "artifact's top level)"),
    ({"file": "inductor/part.aot"}, "its manifest lists a part file 'inductor/part.aot', not a compiled part's name "
                                    "(NAME.aot, at the artifact's top level)"),
    ({"key": "[[[[8, 8], [8, 1], \"torch.nothing\", \"cpu\"]], true]"},
     "its manifest lists a key that is not one: '[[[[8, 8], [8, 1], \"torch.nothing\", \"cpu\"]], true]'"),
    ({"key": None}, "its manifest lists a key that is not one: None"),
], ids=["a list", "a part it does not compile", "a part named by a list", "an unlisted file", "a kernel as a part",
        "a file not named as a part", "a part in a folder", "a key of no dtype", "no key"])
def test_a_part_entry_that_is_not_a_part_it_holds_is_refused_before_any_part_is_copied(tmp_path, entry, message):
    """A good part listed first, then the harmed one: nothing is copied, the good one neither."""
    files = {PART: b"part", "vae-decoder-0123456789abcdef0123.aot": b"decoder", KERNEL: b"kernel", "kernel.py": b"k",
             "inductor/part.aot": b"p"}
    good = {"part": "vae.decoder", "key": KEY.to_json(), "file": "vae-decoder-0123456789abcdef0123.aot"}
    harmed = ["unet"] if entry == "a list" else {"part": "unet", "key": KEY.to_json(), "file": PART, **entry}
    folder, _ = _crafted(tmp_path, files=files, manifest={"parts": [good, harmed]})
    _refused(folder, tmp_path, message.format(key=KEY.to_json(), file=PART))


def test_an_artifact_that_cannot_be_copied_leaves_setup_compiling_in_the_background(tiny_weights, tmp_path, caplog):
    """A trusted artifact whose copy into the cache fails (here a folder stands where its part goes: the
    OS refuses the copy) is not used, the setup log says why, and setup goes on, as with no artifact."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    _crafted(tmp_path)  # into tmp_path/weights/compiled
    cachetrust.private_folder(tmp_path / "cache")
    (tmp_path / "cache" / PART).mkdir()
    fast = _fast(tmp_path, folder, artifact_trusted=True)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath"):
        pipeline.load_pipeline(folder, CPU, torch.float32, fast)
    assert not fast.shipped and fast.load_shipped() and list(fast.parts) == ["unet", "vae.decoder", "vae.encoder"]
    assert (f"compiled parts in {folder / COMPILED} not used: [Errno 21] Is a directory: "
            f"'{tmp_path / 'cache' / PART}'; predictions compile in the background instead") in caplog.messages
    fast.stop()


# ---------------------------------------------------------------- what a bake writes, without a bake
# artifact.write on real CompiledParts of the tiny UNet as a bake leaves them: each compiled or loaded shape's
# file saved where the part saves it (bytes that are no compiled part: write only copies them), a failed one
# with none, and Inductor's kernels in the cache the part chose.

def _as_baked(tiny_weights, tmp_path, sources: dict[ShapeKey, str]) -> CompiledPart:
    part = CompiledPart(tiny_unet(tiny_weights, "cpu"), "unet", Compiler(), tmp_path / "bake-cache")
    for key, source in sources.items():
        part.sources[key] = source
        if source != "failed":
            part.path(key).write_bytes(f"a compiled part for {key.to_json()}".encode())
    kernels = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # the part chose its own: bake-cache/inductor
    (kernels / "ab").mkdir()
    (kernels / "ab" / "kernel.py").write_bytes(b"# a kernel\n")
    (kernels / "ab" / "linked.py").symlink_to("kernel.py")  # shipped as the file it names: read() refuses links
    return part


def _unet_key(height: int, width: int) -> ShapeKey:
    return ShapeKey.of(torch.zeros(2, 9, height, width), torch.tensor(500), torch.zeros(2, 77, 32))


WIDER, TALLER, LARGER = _unet_key(8, 16), _unet_key(16, 8), _unet_key(16, 16)
KERNEL_ENTRY = {"sha256": hashlib.sha256(b"# a kernel\n").hexdigest(), "size": 11}


def test_what_a_bake_writes_is_read_back_whole_and_installs_the_parts_it_compiled_or_loaded(tiny_weights, tmp_path,
                                                                                           monkeypatch):
    part = _as_baked(tiny_weights, tmp_path, {TALLER: "loaded", LARGER: "failed", WIDER: "compiled"})
    assert sorted(part.sources, key=ShapeKey.to_json)[0] == LARGER  # the failed shape comes first, and is passed over
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such folder"))  # nothing is written outside dest's folder
    dest = tmp_path / "image" / "weights" / COMPILED  # whose folders do not exist yet
    pin = artifact.write([part], dest, CPU)
    manifest = json.loads((dest / artifact.MANIFEST).read_bytes())
    assert pin == hashlib.sha256((dest / artifact.MANIFEST).read_bytes()).hexdigest()
    shipped = [TALLER, WIDER]  # in the order of their keys: a bake's manifest is reproducible
    assert manifest == {"format": 1, "machine": artifact.machine(CPU), "parts": [
        {"part": "unet", "key": key.to_json(), "file": part.path(key).name} for key in shipped], "files": {
        **{part.path(key).name: {"sha256": sha256_file(part.path(key)), "size": part.path(key).stat().st_size}
           for key in shipped},
        "inductor/ab/kernel.py": KERNEL_ENTRY, "inductor/ab/linked.py": KERNEL_ENTRY}}
    assert sorted(path.name for path in dest.parent.iterdir()) == [COMPILED]  # no staging left
    cache, seal = _cache(tmp_path)
    assert artifact.install(dest, cache, seal, CPU, trusted=False, pin=pin) == [("unet", key) for key in shipped]
    assert all(seal.read(cache / part.path(key).name) == part.path(key).read_bytes() for key in shipped)


def test_a_bake_replaces_the_artifact_there_whole(tiny_weights, tmp_path):
    part = _as_baked(tiny_weights, tmp_path, {WIDER: "compiled"})
    folder, _ = _crafted(tmp_path)
    artifact.write([part], folder, CPU)
    written = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert written == {artifact.MANIFEST, part.path(WIDER).name, "inductor/ab/kernel.py", "inductor/ab/linked.py"}
    assert sorted(path.name for path in folder.parent.iterdir()) == [COMPILED]


def test_a_bake_that_compiled_nothing_writes_nothing_and_keeps_the_artifact_there(tiny_weights, tmp_path):
    part = _as_baked(tiny_weights, tmp_path, {KEY: "failed"})
    folder, _ = _crafted(tmp_path)
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with pytest.raises(RuntimeError, match="^nothing was compiled, so there is nothing to ship; see the warnings above$"):
        artifact.write([part], folder, CPU)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in folder.parent.iterdir()) == [COMPILED]  # no staging left


def test_a_bake_in_a_process_with_no_inductor_cache_chosen_ships_no_kernels(tiny_weights, tmp_path, monkeypatch):
    part = _as_baked(tiny_weights, tmp_path, {KEY: "compiled"})
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.chdir(tmp_path)  # not taken for Inductor's cache either
    dest = tmp_path / "weights" / COMPILED
    artifact.write([part], dest, CPU)
    assert sorted(json.loads((dest / artifact.MANIFEST).read_bytes())["files"]) == [part.path(KEY).name]
