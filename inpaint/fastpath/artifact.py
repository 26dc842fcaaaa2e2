"""Compiled parts shipped with the weights, so that a fresh container's first prediction runs compiled.

`script/bake-compiled` runs once on a GPU of the deployment's type: it compiles the UNet and the VAE
for every automatic working shape and writes them as a folder `compiled/` beside the checkpoint:

  manifest.json   {"format", "machine": {gpu, capability, torch, diffusers}, "parts": [{part, key}],
                   "files": {relative path: {sha256, size}}}
  *.aot           the compiled parts, named as the compile cache names them
  inductor/...    Inductor's kernels they use

Compiled parts are code: unpickling one runs it. So an artifact is used only when it was baked into
the image (the image's own weights folder, used when COG_WEIGHTS is not set), or when the deployment
pins its manifest's sha256 in INPAINT_COMPILED_MANIFEST_SHA256. Every file must match the manifest,
and one built for another GPU or other versions is not used. `install` copies a trusted artifact into
the compile cache, sealed as this deployment's own (cachetrust); the cache's loader does the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import torch

from .. import cachetrust
from ..weights import sha256_file
from .compiler import PARTS, CompiledPart, _keep_inductor_cache_in
from .keys import ShapeKey

log = logging.getLogger(__name__)

FOLDER = "compiled"  # beside the checkpoint's model_index.json
MANIFEST = "manifest.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20
PIN_SETTING = "INPAINT_COMPILED_MANIFEST_SHA256"
PART_SUFFIX = ".aot"  # as CompiledPart.path names them: the cache's loader looks for no other name


class ArtifactRefused(Exception):
    """The artifact is not used; the message says why and what to do."""


def machine(device: torch.device) -> dict:
    """What compiled parts depend on besides the model: the GPU, its compute capability, the versions."""
    import diffusers

    if device.type == "cuda":
        gpu, capability = torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))
    else:
        gpu, capability = device.type, None
    return {"gpu": gpu, "capability": capability, "torch": torch.__version__, "diffusers": diffusers.__version__}


def write(parts: list[CompiledPart], dest: Path, device: torch.device) -> str:
    """Write what `parts` compiled (or loaded) as an artifact at `dest`, replacing one there; returns the
    sha256 of its manifest, the value a deployment pins."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    entries = []
    for part in parts:
        for key, source in sorted(part.sources.items(), key=lambda item: item[0].to_json()):
            if source == "failed":
                continue
            path = part.path(key)
            shutil.copyfile(path, staging / path.name)
            entries.append({"part": part.part, "key": key.to_json(), "file": path.name})
    if not entries:
        shutil.rmtree(staging)
        raise RuntimeError("nothing was compiled, so there is nothing to ship; see the warnings above")
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # unset: no kernels (Path("") would be the working folder)
    if inductor and Path(inductor).is_dir():
        shutil.copytree(inductor, staging / "inductor", symlinks=False)
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            files[path.relative_to(staging).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"format": FORMAT, "machine": machine(device), "parts": entries, "files": files}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (staging / MANIFEST).write_bytes(data)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return hashlib.sha256(data).hexdigest()


def _relative(name: object) -> PurePosixPath:
    """A manifest's file name as a path inside the artifact; a forged one (absolute, `..`) is refused."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ArtifactRefused(f"its manifest names a file {name!r} that is not a plain relative path")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or path.as_posix() == MANIFEST:  # PurePosixPath drops "" and "."
        raise ArtifactRefused(f"its manifest names a file {name!r} outside the artifact")
    return path


def read(artifact: Path, device: torch.device, *, trusted: bool, pin: str) -> dict:
    """The artifact's manifest, once the artifact may be used, every file it lists is as listed and every
    part's entry names a part, a file and a key (parsed into the entry's "shape_key"); ArtifactRefused
    otherwise, before anything is copied. `trusted`: baked into the image; `pin`: the manifest's sha256
    the deployment set (checked whether or not the artifact is trusted)."""
    path = artifact / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtifactRefused(f"{MANIFEST} is missing or not a regular file")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactRefused(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES:,} bytes")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if pin and digest != pin.strip().lower():
        raise ArtifactRefused(f"its manifest's sha256 is {digest}, not the {PIN_SETTING} this deployment set")
    if not pin and not trusted:
        raise ArtifactRefused(
            f"it did not come with the image and its manifest is not pinned (compiled parts are code: loading "
            f"one runs it); to use it, set {PIN_SETTING} to the sha256 script/bake-compiled printed for it")
    try:
        manifest = json.loads(data)
        files, entries, built_for = manifest["files"], manifest["parts"], manifest["machine"]
        if manifest["format"] != FORMAT or not isinstance(files, dict) or not isinstance(entries, list):
            raise ValueError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ArtifactRefused(f"{MANIFEST} is not a format-{FORMAT} manifest of compiled parts") from None
    here = machine(device)
    if built_for != here:
        raise ArtifactRefused(f"it was built for {json.dumps(built_for, sort_keys=True)}; this machine is "
                              f"{json.dumps(here, sort_keys=True)} (run script/bake-compiled on this kind of GPU)")
    for name, entry in files.items():
        relative = _relative(name)
        file = artifact / relative
        if any(parent.is_symlink() for parent in [file, *file.parents][: len(relative.parts)]) or not file.is_file():
            raise ArtifactRefused(f"{name} is missing or not a regular file")
        if not isinstance(entry, dict) or file.stat().st_size != entry.get("size"):
            raise ArtifactRefused(f"{name} is {file.stat().st_size:,} bytes, not as its manifest lists")
        if sha256_file(file) != entry.get("sha256"):
            raise ArtifactRefused(f"{name} does not match its sha256 in the manifest")
    for entry in entries:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(name), str) for name in ("part", "file")) or (
                entry["part"] not in PARTS or entry["file"] not in files):
            raise ArtifactRefused(f"its manifest lists a part it does not hold: {entry!r}")
        if "/" in entry["file"] or not entry["file"].endswith(PART_SUFFIX):
            raise ArtifactRefused(f"its manifest lists a part file {entry['file']!r}, not a compiled part's name "
                                  f"(NAME{PART_SUFFIX}, at the artifact's top level)")
        try:
            entry["shape_key"] = ShapeKey.from_json(entry.get("key"))
        except ValueError:
            raise ArtifactRefused(f"its manifest lists a key that is not one: {entry.get('key')!r:.200}") from None
    return manifest


def install(artifact: Path, cache_dir: Path, seal: cachetrust.Seal, device: torch.device, *, trusted: bool,
            pin: str = "") -> list[tuple[str, ShapeKey]]:
    """Copy a usable artifact's compiled parts and Inductor kernels into `cache_dir`, sealed as this
    deployment's own; returns the (part, key) it holds, which setup then loads. ArtifactRefused (why)
    when it is not used."""
    manifest = read(artifact, device, trusted=trusted, pin=pin)
    held = []
    for entry in manifest["parts"]:
        target = cache_dir / entry["file"]
        shutil.copyfile(artifact / entry["file"], target)
        os.chmod(target, 0o600)
        seal.seal(target)
        held.append((entry["part"], entry["shape_key"]))
    kernels = [name for name in manifest["files"] if name.startswith("inductor/")]
    inductor = cache_dir / "inductor"
    _keep_inductor_cache_in(inductor, seal)  # what is there already is checked (or moved aside) first
    if kernels and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == str(inductor):
        for name in kernels:
            target = inductor / PurePosixPath(name).relative_to("inductor")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(artifact / name, target)
            os.chmod(target, 0o600)
        seal.seal_tree(inductor)
    elif kernels:
        log.info("the artifact's Inductor kernels are not copied: this deployment chose its own "
                 "TORCHINDUCTOR_CACHE_DIR (a loaded part builds what it misses there)")
    return held
