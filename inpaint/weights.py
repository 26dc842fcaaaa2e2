"""Where the weights live: find or download the checkpoint folder, and trust only what is verified.

A weights folder is the checkpoint's diffusers layout with fp16 safetensors:
  model_index.json, scheduler/, tokenizer/, feature_extractor/,
  unet/diffusion_pytorch_model.fp16.safetensors, vae/diffusion_pytorch_model.fp16.safetensors,
  text_encoder/model.fp16.safetensors (each beside its config.json), safety_checker/.
Every weight file is checked by sha256 against the published manifests shipped in this package,
and the configs then come from inpaint/reference; a folder's own weights-sha256.json (test weights,
a fine-tune) counts only when the deployment pins its sha256 (verify_weights). A successful check
is remembered outside the folder and repeated when a file changes. COG_WEIGHTS may be a folder or an
https tar, unpacked within caps (download_tar).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .config import Settings

log = logging.getLogger(__name__)

MANIFEST_NAME = "weights-sha256.json"
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
# The checkpoint's configs, tokenizer and feature extractor as published: read instead of the folder's
# when the packaged manifests (weights only) are the trust anchor.
REFERENCE = Path(__file__).with_name("reference")
VIEW_PREFIX = "inpaint-checkpoint-"
COMPILED = "compiled"  # compiled parts shipped beside the checkpoint (fastpath/artifact.py); not read by the loaders
_FIX = "run script/download-weights (or set COG_WEIGHTS to a folder or URL holding the checkpoint)"


class WeightsError(RuntimeError):
    """The weights are missing, incomplete or corrupt; the message says what to run."""


def cache_root() -> Path:
    """This container's own cache: unpacked weight archives, verification stamps. Where the XDG Base
    Directory Specification puts it: $XDG_CACHE_HOME, unless it is unset, empty or relative (which the
    specification says to ignore; it would be the working folder, the code's own in an image), then
    $HOME/.cache."""
    chosen = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(chosen) if os.path.isabs(chosen) else Path.home() / ".cache") / "inpaint"


def read_manifest(folder: Path, pin: str = "") -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every file the folder must hold, from the one trust anchor:
    the published manifests packaged here, or the folder's own weights-sha256.json when `pin` (the
    deployment's INPAINT_WEIGHTS_MANIFEST_SHA256) is that file's sha256. An own manifest covers every
    file the model reads (configs and tokenizer too); the packaged ones cover the weights, and the
    configs are then read from inpaint/reference (see verify_weights)."""
    own = folder / MANIFEST_NAME
    if pin:
        if not own.is_file() or own.is_symlink():
            raise WeightsError(
                f"INPAINT_WEIGHTS_MANIFEST_SHA256 is set, but {folder} has no {MANIFEST_NAME}; unset it to "
                "verify against the published checkpoint's manifest"
            )
        data = own.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != pin.strip().lower():
            raise WeightsError(
                f"{MANIFEST_NAME} in {folder} has sha256 {actual}, but INPAINT_WEIGHTS_MANIFEST_SHA256 pins "
                f"{pin.strip()}: the folder is not the one this deployment trusts"
            )
        entries = json.loads(data)
        required = [*CONFIG_FILES, *([SAFETY_CONFIG] if SAFETY_WEIGHTS in entries else [])]
        uncovered = [relative for relative in required if relative not in entries]
        if uncovered:
            raise WeightsError(
                f"{MANIFEST_NAME} in {folder} does not list {', '.join(uncovered)}: an own manifest must hash every "
                "file the model reads (write it with inpaint.weights.write_manifest)"
            )
    else:
        if own.is_file():
            log.warning(
                "%s in %s is ignored: a folder's own manifest counts only when the deployment pins its sha256 "
                "in INPAINT_WEIGHTS_MANIFEST_SHA256; verifying against the published checkpoint's", MANIFEST_NAME, folder,
            )
        published = json.loads(PACKAGE_MANIFEST.read_text())
        entries = {path: entry for path, entry in published.items() if f".{VARIANT}." in path}
        entries.update(json.loads(SAFETY_MANIFEST.read_text()))
    return {path: entry for path, entry in entries.items() if not path.startswith("_")}


def write_manifest(folder: Path, source: str) -> str:
    """Write `folder`'s own weights-sha256.json over every file in it (weights, configs, tokenizer), for
    folders this project makes (tiny test weights, full-size random ones); returns the sha256 that
    INPAINT_WEIGHTS_MANIFEST_SHA256 must pin for the folder to be trusted."""
    manifest: dict = {"_source": source}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative != MANIFEST_NAME and not relative.startswith("."):
            manifest[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (folder / MANIFEST_NAME).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def manifest_pin(folder: Path) -> str:
    """The sha256 of `folder`'s own manifest: the value of INPAINT_WEIGHTS_MANIFEST_SHA256 that trusts it."""
    return hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_layout(folder: Path, manifest: dict[str, dict]) -> None:
    """Refuse anything in the model's folders that the loaders could read besides the allowlisted
    files: links, subfolders, shard indexes and shards, fp32 or pickle weights, extra configs."""
    allowed = set(CONFIG_FILES) | {SAFETY_CONFIG} | set(manifest)
    components = {path.split("/")[0] for path in allowed if "/" in path}
    for name in ["model_index.json", *sorted(components)]:
        path = folder / name
        if path.is_symlink():
            raise WeightsError(f"{name} in {folder} is a link; the weights folder may hold only regular files")
    for component in sorted(components):
        directory = folder / component
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            relative = f"{component}/{entry.name}"
            if entry.is_symlink() or not entry.is_file():
                raise WeightsError(f"{relative} in {folder} is not a regular file; remove it (links and folders are refused)")
            if relative not in allowed:
                raise WeightsError(
                    f"{relative} in {folder} is not a file this model loads (only the fp16 safetensors, configs "
                    f"and tokenizer files are allowed: no shards, indexes, fp32 or pickle weights); remove it"
                )


def _stamp_path(folder: Path) -> Path:
    """Where the verification of `folder` is remembered: in this container's cache, outside the folder
    (a folder cannot vouch for itself), keyed by the folder's resolved path. Each file's record names
    the sha256 it was checked against, so a manifest that names another one has the file hashed again."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return cache_root() / "verified" / f"{key}.json"


def verify_weights(folder: Path, *, pin: str = "", force: bool = False, safety_checker: bool = True) -> Path:
    """The folder to load the model from, once every file the model reads is trusted; else WeightsError.

    Every manifest file must be present with its size and sha256, and nothing else the loaders could
    read may be there (check_layout). With the packaged manifests, the configs, tokenizer and feature
    extractor come from inpaint/reference, and the returned folder is a view of them beside the
    verified weights; with a pinned own manifest, which hashes them too, it is `folder` itself. With
    safety_checker False the checker's files are not required. A successful check is remembered
    outside the folder (size, mtime, ctime and inode per file; ctime and inode cannot be carried by
    a copy or an archive) and repeated when a file changes."""
    if not (folder / "model_index.json").is_file():
        raise WeightsError(f"no checkpoint in {folder} (model_index.json is missing); {_FIX}")
    manifest = read_manifest(folder, pin)
    check_layout(folder, manifest)
    if not safety_checker:
        manifest = {path: entry for path, entry in manifest.items() if not path.startswith("safety_checker/")}
    stamp_path = _stamp_path(folder)
    try:
        stamp = {} if force else json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    verified = {}
    for relative, entry in sorted(manifest.items()):
        path = folder / relative
        if not path.is_file():
            hint = " (or set INPAINT_SAFETY_CHECKER=0 to run without the checker)" if relative.startswith("safety_checker/") else ""
            kind = "weight file" if relative.endswith(".safetensors") else "file"
            raise WeightsError(f"{kind} {relative} is missing from {folder}; {_FIX}{hint}")
        stat = path.stat()
        if stat.st_size != entry["size"]:
            raise WeightsError(
                f"weight file {relative} is {stat.st_size:,} bytes, expected {entry['size']:,} "
                f"(incomplete or wrong file); {_FIX}"
            )
        fingerprint = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, entry["sha256"]]
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
        stamp_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=stamp_path.parent, prefix=".stamp-")
        with os.fdopen(fd, "w") as file:
            json.dump(verified, file)
        os.replace(partial, stamp_path)
    except OSError:
        pass  # no writable cache: the files are simply hashed again next time
    if pin:
        return folder
    return _reference_view(folder, manifest)


def _reference_view(folder: Path, manifest: dict[str, dict]) -> Path:
    """A fresh private folder holding inpaint/reference's configs, tokenizer and feature extractor, and
    links to the verified weight files of `folder`: what the loaders read when the packaged manifests
    are the trust anchor. release_view removes it once the model is loaded."""
    view = Path(tempfile.mkdtemp(prefix=VIEW_PREFIX))
    for relative in [*CONFIG_FILES, SAFETY_CONFIG]:
        (view / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REFERENCE / relative, view / relative)
    for relative in manifest:
        (view / relative).parent.mkdir(parents=True, exist_ok=True)
        (view / relative).symlink_to((folder / relative).resolve())
    if (folder / COMPILED).is_dir():  # compiled parts shipped beside the weights: checked by fastpath/artifact.py
        (view / COMPILED).symlink_to((folder / COMPILED).resolve())
    return view


def release_view(folder: Path) -> None:
    """Remove a folder made by _reference_view (links and config copies only); any other folder stays."""
    if folder.name.startswith(VIEW_PREFIX) and folder.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(folder, ignore_errors=True)


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
    release_view(verify_weights(dest, force=True, safety_checker=settings.safety_checker))
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


class _HttpsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https: a signed https URL must not be downgraded to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise urllib.error.URLError(f"refused a redirect to {redact(newurl)}: only https is followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def redact(url: str) -> str:
    """The URL without userinfo, query or fragment, for logs and messages: a signed URL's signature
    (X-Amz-Signature, a token) stays out of the setup logs, which Cog's server hands to any client."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    hidden = " (query hidden)" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + hidden


class _Budget:
    """A file-like view of a download that stops it past a byte cap or an overall deadline (the
    socket's own timeout bounds each read, this bounds them all). It reads what has arrived (read1) and
    looks at the clock between reads: a response's read(size) waits for all `size` bytes, and a host that
    trickled them held it for as long as it liked."""

    def __init__(self, response, max_bytes: int, deadline: float, url: str) -> None:
        self.response, self.max_bytes, self.deadline, self.url, self.read_bytes = response, max_bytes, deadline, url, 0

    def read(self, size: int) -> bytes:  # tarfile always asks for a size, and looks for a compression's magic in it
        data = bytearray()
        while len(data) < size:
            if time.monotonic() > self.deadline:
                raise WeightsError(f"the weights archive {self.url} took longer than INPAINT_WEIGHTS_ARCHIVE_TIMEOUT allows")
            chunk = self.response.read1(size - len(data))
            if not chunk:
                break
            data += chunk
            self.read_bytes += len(chunk)
            if self.read_bytes > self.max_bytes:
                raise WeightsError(
                    f"the weights archive {self.url} is over {self.max_bytes:,} bytes (INPAINT_WEIGHTS_ARCHIVE_MAX_BYTES)"
                )
        return bytes(data)


def archive_cap(settings: Settings) -> int:
    """Bytes a weights archive may hold, unpacked: the setting, else 1.2x the published checkpoint plus
    16 MiB for its configs and tokenizer."""
    if settings.weights_archive_max_bytes:
        return settings.weights_archive_max_bytes
    published = {**json.loads(PACKAGE_MANIFEST.read_text()), **json.loads(SAFETY_MANIFEST.read_text())}
    total = sum(entry["size"] for path, entry in published.items() if f".{VARIANT}." in path)
    return int(total * 1.2) + (16 << 20)


def download_tar(url: str, cache_root: Path, settings: Settings) -> Path:
    """Fetch a tar (optionally compressed) of a weights folder from an https COG_WEIGHTS and unpack it once.

    Bounded: https only (no downgrade on redirect), at most archive_cap bytes downloaded and unpacked,
    at most settings.weights_archive_max_members entries, only regular files and folders (no links or
    devices, nothing outside the folder), and one deadline for it all."""
    shown = redact(url)
    if urllib.parse.urlsplit(url).scheme != "https":
        raise WeightsError(f"COG_WEIGHTS={shown} is not an https URL; serve the weights archive over https")
    dest = cache_root / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not _checkpoint_root(dest):
        log.info("downloading weights archive %s", shown)
        cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="weights-", dir=cache_root))
        cap, deadline = archive_cap(settings), time.monotonic() + settings.weights_archive_timeout
        opener = urllib.request.build_opener(_HttpsOnly)
        try:
            with opener.open(url, timeout=60) as response:
                budget = _Budget(response, cap, deadline, shown)
                with tarfile.open(fileobj=budget, mode="r|*") as tar:
                    _extract(tar, tmp, cap, settings.weights_archive_max_members, shown)
        except (OSError, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WeightsError(f"could not fetch the weights archive COG_WEIGHTS={shown} ({_without_url(error, url)})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    root = _checkpoint_root(dest)
    if root is None:
        raise WeightsError(f"the archive COG_WEIGHTS={shown} holds no model_index.json")
    return root


def _extract(tar: tarfile.TarFile, into: Path, cap: int, max_members: int, shown: str) -> None:
    """Unpack a streamed tar member by member, each checked before it is written (the deadline is
    _Budget's: every byte of a header or a member's data is read through it)."""
    unpacked = 0
    for count, member in enumerate(tar, start=1):
        if count > max_members:
            raise WeightsError(f"the weights archive {shown} has over {max_members:,} entries (INPAINT_WEIGHTS_ARCHIVE_MAX_MEMBERS)")
        if not (member.isfile() or member.isdir()):
            raise WeightsError(f"the weights archive {shown} holds {member.name!r}, which is not a regular file or folder")
        unpacked += member.size
        if unpacked > cap:
            raise WeightsError(f"the weights archive {shown} unpacks to over {cap:,} bytes (INPAINT_WEIGHTS_ARCHIVE_MAX_BYTES)")
        tar.extract(member, into, filter="data")  # "data" also refuses names out of the folder; "/x" is unpacked as "x"


def _without_url(error: BaseException, url: str) -> str:
    return str(error).replace(url, redact(url))


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
    for path in sorted(folder.glob(f"*/*.{VARIANT}.safetensors")):  # the checker's may be absent when it is off
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
    """The folder to load the verified checkpoint from (verify_weights): COG_WEIGHTS (folder or https
    URL) if given, else settings.weights_dir, downloaded there if empty."""
    if weights:
        text = str(weights)
        if "://" in text:
            folder = download_tar(text, cache_root(), settings)
        else:
            folder = Path(text)
            if not folder.is_dir():
                raise WeightsError(f"COG_WEIGHTS={text} is not a folder; point it at a checkpoint folder or tar URL")
    else:
        folder = settings.weights_dir
        if not (folder / "model_index.json").is_file():
            download_checkpoint(settings, folder)
    return verify_weights(folder, pin=settings.weights_manifest_sha256, safety_checker=settings.safety_checker)
