"""The compile cache is code: saved compiled parts are pickles, and Inductor's cache holds kernels and
Python that torch imports. What of it this process may load is decided here.

- The folder is made 0700. A folder or file that is a link, is not owned by this user, or is
  writable by group or others is refused with a log line (fastpath/compiler.py then keeps its parts in a
  private temporary folder for this process).
- Every saved part is sealed with an HMAC-SHA256 of its bytes, keyed by the deployment's secret
  (INPAINT_COMPILE_CACHE_KEY), else by a random key kept 0600 in the folder. A part is unpickled
  only from bytes whose seal checks out.
- Inductor's cache is sealed as a whole: a signed list of its files and their sha256, checked before
  torch is pointed at it; any difference moves it aside, and a new one starts empty.
- What is refused is moved aside (`<name>.rejected-<time>`), never deleted, so it can be looked at.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

KEY_NAME = ".key"
SEAL_SUFFIX = ".hmac"
TREE_SEAL_SUFFIX = ".seal.json"


class UntrustedCache(Exception):
    """A cache file or folder this process must not load code from; the message says why."""


def check_private(path: Path, *, secret: bool = False) -> None:
    """Raise UntrustedCache unless `path` is this user's own, not a link, and writable by nobody else
    (for a key, readable by nobody else either)."""
    try:
        info = path.lstat()
    except OSError as error:
        raise UntrustedCache(f"{path} cannot be read ({error.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedCache(f"{path} is a link")
    if info.st_uid != os.geteuid():
        raise UntrustedCache(f"{path} belongs to user {info.st_uid}, not to this process's user {os.geteuid()}")
    forbidden = 0o077 if secret else 0o022
    if info.st_mode & forbidden:
        raise UntrustedCache(f"{path} has mode {stat.S_IMODE(info.st_mode):o}: {'readable' if secret else 'writable'} by others")


def private_folder(folder: Path) -> Path:
    """`folder`, made 0700 if it is new, once check_private passes on it; else UntrustedCache or OSError."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(folder)
    return folder


def move_aside(path: Path) -> Path:
    """Rename a refused file or folder (and its seal) out of the way, keeping it for inspection."""
    aside = path.with_name(f"{path.name}.rejected-{time.time_ns()}")
    path.rename(aside)
    seal = path.with_name(path.name + SEAL_SUFFIX)
    if seal.exists():
        seal.rename(aside.with_name(aside.name + SEAL_SUFFIX))
    return aside


def write_private(path: Path, data: bytes) -> None:
    """Write atomically, from a temporary file of mkstemp's (0600, a unique name even on a shared volume)."""
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


class Seal:
    """Signs and checks what fastpath/compiler.py saves in one cache folder."""

    def __init__(self, folder: Path, secret: str = "") -> None:
        self.folder = folder
        self.key = secret.encode() if secret else self._folder_key()

    def _folder_key(self) -> bytes:
        path = self.folder / KEY_NAME
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            check_private(path, secret=True)
            return path.read_bytes()
        with os.fdopen(descriptor, "wb") as file:
            key = secrets.token_hex(32).encode()
            file.write(key)
        return key

    def _mac(self, data: bytes) -> str:
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def seal(self, path: Path) -> None:
        """Sign the file at `path` as it is now."""
        write_private(path.with_name(path.name + SEAL_SUFFIX), self._mac(path.read_bytes()).encode())

    def read(self, path: Path) -> bytes:
        """The bytes of a sealed file, read once and checked: load from these, not from the file again."""
        check_private(path)
        seal = path.with_name(path.name + SEAL_SUFFIX)
        if not seal.is_file():
            raise UntrustedCache(f"{path.name} has no seal ({seal.name})")
        check_private(seal)
        data = path.read_bytes()
        if not hmac.compare_digest(self._mac(data), seal.read_text().strip()):
            raise UntrustedCache(f"{path.name} does not match its seal: it was not written by this deployment's compiles")
        return data

    def seal_tree(self, folder: Path) -> None:
        """Sign the list of every file under `folder` with its sha256."""
        listing = json.dumps(_tree(folder), sort_keys=True)
        record = {"files": listing, "hmac": self._mac(listing.encode())}
        write_private(folder.with_name(folder.name + TREE_SEAL_SUFFIX), json.dumps(record).encode())

    def check_tree(self, folder: Path) -> None:
        """Raise UntrustedCache unless `folder` holds exactly the files its signed list names, unchanged."""
        seal = folder.with_name(folder.name + TREE_SEAL_SUFFIX)
        if not seal.is_file():
            raise UntrustedCache(f"{folder.name} has no seal ({seal.name})")
        check_private(seal)
        try:
            record = json.loads(seal.read_text())
            listing, mac = record["files"], record["hmac"]
        except (ValueError, KeyError, TypeError):
            raise UntrustedCache(f"{seal.name} is not a seal") from None
        if not hmac.compare_digest(self._mac(listing.encode()), mac):
            raise UntrustedCache(f"{seal.name} was not signed by this deployment")
        if json.loads(listing) != _tree(folder):
            raise UntrustedCache(f"{folder.name} holds files that its seal does not list, or changed ones")


def _tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`; a link or a file of someone else's is refused."""
    files = {}
    for root, directories, names in os.walk(folder):
        for name in [*directories, *names]:
            check_private(Path(root) / name)
        for name in names:
            path = Path(root) / name
            files[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files
