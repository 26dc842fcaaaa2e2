"""Where the weights live: find or download the checkpoint folder, and verify every weight file by sha256.

A weights folder is the checkpoint's diffusers layout with fp16 safetensors:
  model_index.json, scheduler/, tokenizer/, feature_extractor/,
  unet/diffusion_pytorch_model.fp16.safetensors, vae/diffusion_pytorch_model.fp16.safetensors,
  text_encoder/model.fp16.safetensors (each beside its config.json).
The files are checked against a sha256 manifest: the folder's own `weights-sha256.json` if it has one
(test weights written by script/make-tiny-weights do), else the published checkpoint's manifest
shipped in this package. Hashing 2.6 GB takes seconds, so a successful check is remembered in
`.verified.json` (size and mtime per file) and repeated only when a file changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .config import Settings

log = logging.getLogger(__name__)

MANIFEST_NAME = "weights-sha256.json"
STAMP_NAME = ".verified.json"
PACKAGE_MANIFEST = Path(__file__).with_name(MANIFEST_NAME)
SAFETY_MANIFEST = Path(__file__).with_name("safety-checker-sha256.json")
# The file names the two source repositories really hold, from their public tree listings at the
# pinned revisions: tests build their stand-in hub from this, never from the names below.
REMOTE_LAYOUT = Path(__file__).with_name("remote-layout.json")
VARIANT = "fp16"
# The checker's fp16 file: the same name in stable-diffusion-v1-5's safety_checker/ and here, where
# transformers' `variant="fp16"` finds it.
SAFETY_WEIGHTS = "safety_checker/model.fp16.safetensors"
SAFETY_CONFIG = "safety_checker/config.json"
# The checkpoint's files this project loads besides the weights: configs, tokenizer, feature extractor.
CONFIG_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "feature_extractor/preprocessor_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
)
_FIX = "run script/download-weights (or set COG_WEIGHTS to a folder or URL holding the checkpoint)"


class WeightsError(RuntimeError):
    """The weights are missing, incomplete or corrupt; the message says what to run."""


def read_manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every weight file the folder must hold."""
    own = folder / MANIFEST_NAME
    if own.is_file():
        entries = json.loads(own.read_text())
    else:
        published = json.loads(PACKAGE_MANIFEST.read_text())
        entries = {path: entry for path, entry in published.items() if f".{VARIANT}." in path}
        entries.update(json.loads(SAFETY_MANIFEST.read_text()))
    return {path: entry for path, entry in entries.items() if not path.startswith("_")}


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(folder: Path, *, force: bool = False, safety_checker: bool = True) -> None:
    """Raise WeightsError unless every manifest file is present with its size and sha256.

    With safety_checker False the checker's files are not required.
    """
    if not (folder / "model_index.json").is_file():
        raise WeightsError(f"no checkpoint in {folder} (model_index.json is missing); {_FIX}")
    manifest = read_manifest(folder)
    if not safety_checker:
        manifest = {path: entry for path, entry in manifest.items() if not path.startswith("safety_checker/")}
    stamp_path = folder / STAMP_NAME
    try:
        stamp = {} if force else json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    verified = {}
    for relative, entry in sorted(manifest.items()):
        path = folder / relative
        if not path.is_file():
            hint = " (or set INPAINT_SAFETY_CHECKER=0 to run without the checker)" if relative == SAFETY_WEIGHTS else ""
            raise WeightsError(f"weight file {relative} is missing from {folder}; {_FIX}{hint}")
        stat = path.stat()
        if stat.st_size != entry["size"]:
            raise WeightsError(
                f"weight file {relative} is {stat.st_size:,} bytes, expected {entry['size']:,} "
                f"(incomplete or wrong file); {_FIX}"
            )
        fingerprint = [stat.st_size, stat.st_mtime_ns, entry["sha256"]]
        if stamp.get(relative) != fingerprint:
            log.info("verifying sha256 of %s (%.0f MB)", relative, stat.st_size / 1e6)
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise WeightsError(
                    f"weight file {relative} is corrupt: sha256 {actual} does not match the manifest's "
                    f"{entry['sha256']}; delete it and {_FIX}"
                )
        verified[relative] = fingerprint
    try:
        stamp_path.write_text(json.dumps(verified, indent=1))
    except OSError:
        pass  # a read-only folder is fine: it is simply hashed again next time


def download_plan(settings: Settings) -> list[tuple[str, str, str, list[str]]]:
    """(setting prefix, repository, revision, files) for each source: exactly the files this project
    loads, by their names in the source repositories."""
    published = sorted(path for path in json.loads(PACKAGE_MANIFEST.read_text()) if f".{VARIANT}." in path)
    plan = [("INPAINT_WEIGHTS", settings.weights_repo, settings.weights_revision, [*CONFIG_FILES, *published])]
    if settings.safety_checker:
        plan.append(("INPAINT_SAFETY", settings.safety_repo, settings.safety_revision, [SAFETY_CONFIG, SAFETY_WEIGHTS]))
    return plan


def download_checkpoint(settings: Settings, dest: Path) -> Path:
    """Download the checkpoint's fp16 files (and the safety checker's) from the Hugging Face hub, then verify all."""
    from huggingface_hub import hf_hub_download

    dest.mkdir(parents=True, exist_ok=True)
    for prefix, repo, revision, files in download_plan(settings):
        log.info("downloading %d files of %s at revision %s into %s", len(files), repo, revision, dest)

        def fetch(relative: str) -> None:
            try:
                hf_hub_download(repo, relative, revision=revision, local_dir=dest)
            except Exception as error:  # the hub client raises many types (HTTP, offline, auth); all mean the same here
                raise WeightsError(_download_failed(prefix, repo, revision, relative, error, dest)) from error

        # A few at a time: the large files download side by side; the first failure is the one reported.
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="download") as pool:
            futures = [pool.submit(fetch, relative) for relative in files]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    verify_weights(dest, force=True, safety_checker=settings.safety_checker)
    return dest


def _download_failed(prefix: str, repo: str, revision: str, relative: str, error: Exception, dest: Path) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    remedy = (
        f"check the network and HF_TOKEN, or set {prefix}_REPO and {prefix}_REVISION to a source that holds "
        f"it (with a matching manifest in inpaint/)"
    )
    if prefix == "INPAINT_SAFETY":
        remedy += ", or turn the safety checker off with INPAINT_SAFETY_CHECKER=0"
    else:
        remedy += f", or put the checkpoint in {dest}"
    return f"could not download {relative} from {repo} at revision {revision} ({type(error).__name__}: {reason}); {remedy}"


def download_tar(url: str, cache_root: Path) -> Path:
    """Fetch a tar (optionally compressed) of a weights folder from COG_WEIGHTS and unpack it once."""
    dest = cache_root / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not _checkpoint_root(dest):
        log.info("downloading weights archive %s", url)
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="weights-", dir=cache_root))
        try:
            with urllib.request.urlopen(url, timeout=60) as response, tarfile.open(fileobj=response, mode="r|*") as tar:
                tar.extractall(tmp, filter="data")  # "data" refuses absolute paths, links out and devices
        except (OSError, tarfile.TarError) as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WeightsError(f"could not fetch the weights archive COG_WEIGHTS={url} ({error})") from error
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    root = _checkpoint_root(dest)
    if root is None:
        raise WeightsError(f"the archive COG_WEIGHTS={url} holds no model_index.json")
    return root


def _checkpoint_root(folder: Path) -> Path | None:
    """folder itself, or its single subfolder, when it holds model_index.json."""
    if (folder / "model_index.json").is_file():
        return folder
    if folder.is_dir():
        children = [child for child in folder.iterdir() if child.is_dir()]
        if len(children) == 1 and (children[0] / "model_index.json").is_file():
            return children[0]
    return None


def read_ahead(folder: Path, chunk: int = 16 << 20) -> None:
    """Read every weight file once, so that the page cache holds them when the model loads: a cold
    disk is then read in large sequential blocks rather than page fault by page fault."""
    buffer = bytearray(chunk)
    for relative in read_manifest(folder):
        path = folder / relative
        if path.is_file():  # the checker's file may be absent when the checker is off
            with open(path, "rb", buffering=0) as file:
                while file.readinto(buffer):
                    pass


def resolve_weights_ahead(weights: str | os.PathLike | None, settings: Settings) -> Future[Path]:
    """resolve_weights, then read_ahead, in a background thread; the future gives the folder or raises
    resolve_weights' error. Started before the process imports torch and diffusers, the disk work
    (download, sha256, reads; none of it holds Python's lock) runs while the imports do."""
    # What a download imports is imported here, so the thread imports nothing: two threads importing
    # modules that import each other can deadlock on the import locks (diffusers imports it anyway).
    from huggingface_hub import hf_hub_download  # noqa: F401

    def resolve_and_read() -> Path:
        folder = resolve_weights(weights, settings)
        read_ahead(folder)
        return folder

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights")
    try:
        return executor.submit(resolve_and_read)
    finally:
        executor.shutdown(wait=False)


def resolve_weights(weights: str | os.PathLike | None, settings: Settings) -> Path:
    """The verified checkpoint folder: COG_WEIGHTS (folder or URL) if given, else settings.weights_dir,
    downloaded there if empty."""
    if weights:
        text = str(weights)
        if text.startswith(("http://", "https://")):
            folder = download_tar(text, Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inpaint")
        else:
            folder = Path(text)
            if not folder.is_dir():
                raise WeightsError(f"COG_WEIGHTS={text} is not a folder; point it at a checkpoint folder or tar URL")
    else:
        folder = settings.weights_dir
        if not (folder / "model_index.json").is_file():
            download_checkpoint(settings, folder)
    verify_weights(folder, safety_checker=settings.safety_checker)
    return folder
