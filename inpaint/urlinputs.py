"""The photo and mask given as URLs or data URIs: fetched inside the prediction, held to the limits, removed.

Cog's SDK (0.23.1) fetches an http(s) URL or data URI given for a Path input before `run()` starts
(`cog.types.URLPath.convert`, each input of a prediction in a thread of its own), with
`shutil.copyfileobj`: no cap on size or time (requests' timeout is per read), and nothing removes the
file. Held to limits there, a prediction whose other input failed still left its file behind, since
its `run()` never came: a client could fill the disk with a large image URL and a mask URL that fails
(docs/serving.md, "Input files"; tests/test_urlinputs.py keeps it at nothing).

So `Downloads.install` replaces that method, at setup, with one that fetches nothing: it hands `run()`
a path that says what to fetch (`Pending`). `run()` fetches its inputs once it holds them, both at
once, through `Downloads.prediction` (URLs through egress.py: allowed addresses only, one deadline,
headers included), and every file it fetched is removed when it ends, whatever the outcome: nothing
is written that no `run()` holds. A refused or failed fetch fails the prediction with a message that
names the input, and cancelling the prediction cuts its fetches. It replaces `Path.validate` for data
URIs too, which the SDK decoded there, before `run()`: a damaged one failed with base64's bare words and
no input named. A string that is neither an http(s) URL nor a data URI is refused (`parse_input`).
"""

from __future__ import annotations

import base64
import email.message
import io
import mimetypes
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from . import egress
from .weights import redact

PENDING = "inpaint_pending"  # the attribute of a path handed to run() that says what to fetch into it
CANCEL_CHECK_SECONDS = 0.05  # how often a prediction's fetches look whether it was cancelled
MAX_URL_CHARACTERS = 65536  # a longer input string is refused unless it is a data URI (parse_input)
_LEADING = "".join(map(chr, range(33)))  # what urlsplit strips from a URL's start: C0 controls and space (WHATWG)


class Cancellable(Protocol):
    """What says whether the prediction was cancelled (concurrency.CancelToken)."""

    @property
    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class Pending:
    """An input Cog's server was given as `source` (an http(s) URL, or a data URI) and has neither fetched
    nor decoded; or, where `refused` says why, one that is neither, which run() refuses naming the input."""

    source: str
    filename: str = ""
    refused: str = ""

    @property
    def is_url(self) -> bool:
        """An http(s) URL; else a data URI (for one that is not refused)."""
        return not is_data_uri(self.source)


class Downloads:
    """The inputs fetched in this process, in `folder` (a new private one by default)."""

    def __init__(self, max_bytes: int, max_seconds: float, folder: Path | None = None,
                 networks: Sequence[egress.Network] = ()) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.networks = tuple(networks)  # besides public addresses, those an input's URL may reach (egress.py)
        self.lookups = threading.Semaphore(egress.LOOKUPS_AT_ONCE)  # the name lookups of all its fetches
        if folder is None:  # a folder of its own, removed with whatever is in it when the process exits
            folder = Path(tempfile.mkdtemp(prefix="inpaint-inputs-"))
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        self.folder = folder

    def install(self) -> Downloads:
        """From now on, Cog's SDK hands run() each URL or data URI input of this process as a Pending path,
        which Downloads.prediction fetches."""
        from cog.types import Path as CogPath
        from cog.types import URLPath

        folder = self.folder
        cog_validate = CogPath.validate.__func__

        def validate(cls: type[CogPath], value: object) -> Path:
            """For an http(s) URL or a data URI, a URLPath that convert hands on unfetched (Cog's decoded a data
            URI here, twice, and a damaged one failed with base64's bare words, no input named); for any other
            string, a path that run() refuses, naming the input (parse_input)."""
            if not isinstance(value, str):
                return cog_validate(cls, value)
            found = parse_input(value)
            if not found.refused:
                return URLPath(source=value, filename=found.filename, fileobj=io.BytesIO())  # (never read)
            path = CogPath(folder / "not-fetched")
            setattr(path, PENDING, found)
            return path

        def convert(self: URLPath) -> CogPath:
            """A path for run() that says what to fetch (nothing is fetched here; the path names no file)."""
            if self._path is None:
                path = CogPath(folder / f"not-fetched-{self.filename}")
                setattr(path, PENDING, Pending(self.source, self.filename))
                self._path = path
            return self._path

        CogPath.validate = classmethod(validate)
        URLPath.convert = convert
        return self

    @contextmanager
    def prediction(self) -> Iterator[Inputs]:
        """One prediction's inputs: fetched with `fetch`, every file removed when the block ends."""
        inputs = Inputs(self)
        try:
            yield inputs
        finally:
            inputs.close()

    def fetch_url(self, url: str, filename: str, guard: egress.Guard | None = None) -> Path:
        """GET `url` as Cog's SDK would, through egress's guard (a new one by default): allowed addresses
        only, and one deadline for the connections, the headers and the body."""
        guard = guard or self.guard()
        agent = os.environ.get("COG_USER_AGENT")  # the SDK sends it when set
        try:
            with guard, egress.get(url, guard, {"User-Agent": agent} if agent else None) as body:
                return self.copy(body, url, filename)  # the guard cuts it at its deadline
        except egress.Late:
            raise self._late(url) from None
        except egress.RefusedAddress as refused:
            raise ValueError(f"{_named(url)} is not fetched: {refused}. Give a URL on the public internet, or upload "
                             "the file itself") from None
        except egress.Status as status:
            raise ValueError(f"{_named(url)} answered HTTP {status}; check the URL (a signed one may have expired), "
                             "or upload the file itself") from None
        except egress.FetchError as error:
            raise ValueError(f"{_named(url)} could not be fetched ({error}); check the URL, or upload the file "
                             "itself") from None

    def guard(self) -> egress.Guard:
        """A new fetch's guard: its deadline starts now."""
        return egress.Guard(time.monotonic() + self.max_seconds, self.networks, self.lookups)

    def _late(self, source: str) -> ValueError:
        return ValueError(f"{_named(source)} did not arrive within {self.max_seconds:g} s "
                          "(INPAINT_MAX_DOWNLOAD_SECONDS); send it from a faster host, or upload it")

    def copy(self, source_file: BinaryIO, source: str, filename: str) -> Path:
        """Copy `source_file` (an HTTP response's body, which its guard cuts at the deadline, or the bytes of
        a data URI, from `source`) into a new file in the folder whose name ends in `filename`, within the
        byte limit; a copy that fails leaves nothing."""
        # What has arrived (read1): a trickle is counted as it comes. A raw file has read() alone.
        read = source_file.read1 if hasattr(source_file, "read1") else source_file.read
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=filename, delete=False) as dest:
            try:
                copied = 0
                while chunk := read(1 << 20):
                    copied += len(chunk)
                    if copied > self.max_bytes:
                        raise ValueError(f"{_named(source)} is over the limit of {self.max_bytes:,} bytes "
                                         "(INPAINT_MAX_UPLOAD_BYTES); send a smaller or compressed image")
                    dest.write(chunk)
            except BaseException:
                Path(dest.name).unlink(missing_ok=True)
                raise
        return Path(dest.name)


class Inputs:
    """One prediction's fetches and files (Downloads.prediction)."""

    def __init__(self, downloads: Downloads) -> None:
        self.downloads = downloads
        self.files: list[Path] = []
        self._guards: list[egress.Guard] = []
        self._lock = threading.Lock()
        self._cut = False

    def fetch(self, named: Mapping[str, Path | str | None], token: Cancellable) -> list[Path | None]:
        """Each input (by its name) as a file, in the order given: a Pending one, or a string (as Cog's server
        hands over one it did not take for a URL), fetched into the folder (all at once); a path as it is. The
        first failure cuts the other fetches and is raised, naming its input; a cancel of `token` (polled) cuts
        them all."""
        found = list(named.values())
        jobs = {index: (name, parse_input(path) if isinstance(path, str) else getattr(path, PENDING))
                for index, (name, path) in enumerate(named.items()) if isinstance(path, str) or hasattr(path, PENDING)}
        if not jobs:
            return found
        first: BaseException | None = None
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="inpaint-fetch") as pool:
            futures = {pool.submit(self._one, *job): index for index, job in jobs.items()}
            undone = set(futures)
            while undone:
                done, undone = wait(undone, timeout=CANCEL_CHECK_SECONDS, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None and first is None:
                        first = future.exception()  # the cause: the others fail next, cut short by it
                if first is not None or token.cancelled:
                    self.cut()
                for future in done:
                    if future.exception() is None:
                        found[futures[future]] = future.result()
        if first is not None:
            raise first
        return found

    def _one(self, name: str, pending: Pending) -> Path:
        downloads = self.downloads
        try:
            if pending.refused:
                raise ValueError(pending.refused)
            if not pending.is_url:  # a data URI: its bytes are in the request
                with _decoded(pending.source) as data:
                    path = downloads.copy(data, pending.source, pending.filename)
            else:
                guard = downloads.guard()
                with self._lock:
                    self._guards.append(guard)
                    if self._cut:
                        guard.cut()
                path = downloads.fetch_url(pending.source, pending.filename, guard)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        with self._lock:
            self.files.append(path)
        return path

    def cut(self) -> None:
        """End every fetch of this prediction now (each then fails with its deadline's message)."""
        with self._lock:
            self._cut = True
            guards = list(self._guards)
        for guard in guards:
            guard.cut()

    def close(self) -> None:
        self.cut()
        with self._lock:
            files, self.files = self.files, []
        for path in files:
            path.unlink(missing_ok=True)


def parse_input(value: str) -> Pending:
    """What an input given as a string asks for: an http(s) URL or a data URI to fetch, or, refused, anything
    else. Cog's HTTP API takes files as URLs (its docs/http.md), but its server (coglet 0.23.1) hands run()
    any other string as it is, which was then read as a path on this machine: a request could have any image
    the server can read painted and sent back, and learn which files exist.

    A data URI is told by its start alone, and nothing longer than a URL may be reaches urlsplit: urlsplit
    keeps the strings it splits, and what it made of them, in a cache of 128 (functools.lru_cache), so each
    data URI it saw stayed in memory twice over, megabytes a prediction, long after it ended."""
    if is_data_uri(value):
        return Pending(value, data_filename(value))
    if not value or value.isspace():  # as some clients send an input they leave blank
        return Pending(value, refused="a blank value is no file; give the file as an http(s) URL or a data URI "
                                      "(data:image/png;base64,<data>), or leave an optional input out")
    if len(value) > MAX_URL_CHARACTERS:
        return Pending(value, refused=f"{_shown(value)} is {len(value):,} characters long, over the "
                                      f"{MAX_URL_CHARACTERS:,} a URL may have here; send the file itself as a data URI "
                                      "(data:image/png;base64,<data>)")
    try:
        scheme = urllib.parse.urlsplit(value).scheme
    except ValueError as error:  # urllib's "Invalid IPv6 URL"
        return Pending(value, refused=f"{_shown(value)} is not a valid URL ({error}); check it")
    if scheme in ("http", "https"):
        return Pending(value, "file")  # (Cog's SDK names it after the URL's path: the name is only a suffix here)
    return Pending(value, refused=f"{_shown(value)} is neither an http(s) URL nor a data URI; send the file as one "
                                  "(data:image/png;base64,<data>): a path on the server is not read")


def is_data_uri(value: str) -> bool:
    """Whether `value` starts as a data URI, its scheme in either case, after the blanks and control characters
    urlsplit strips (read from the start alone: no copy of the data)."""
    return value.lstrip(_LEADING)[:5].lower() == "data:"


def _shown(value: str) -> str:
    """A refused input's value for its message: without a query (a signed URL's), and at most 100 characters
    (read from the start alone: the value may be megabytes)."""
    return repr(_cut(value[:101].partition("?")[0], 100))


def data_filename(uri: str) -> str:
    """The name Cog's SDK gives a data URI's file ("file" and its media type's extension, cog.types.get_filename),
    read from the URI's header alone."""
    header = email.message.Message()
    header["Content-Type"] = _split_data_uri(uri)[0]  # its parameters (";base64") aside; none: text/plain
    return "file" + (mimetypes.guess_extension(header.get_content_type()) or "")


def _split_data_uri(uri: str) -> tuple[str, int]:
    """A data URI's media type ("image/png;base64") and where its data starts (-1: no comma), found without
    copying the data: str.partition copied all of it, megabytes, only to read the header."""
    start = uri.find(":") + 1
    comma = uri.find(",", start)
    return uri[start:comma if comma >= 0 else len(uri)], comma + 1 if comma >= 0 else -1


def _decoded(uri: str) -> BinaryIO:
    """A data URI's bytes, decoded as Cog's SDK decodes them (urllib.request's data: handler, whose four steps
    these are); a damaged one is a ValueError that says what is wrong with it."""
    remedy = "send the whole file in base64, as data:image/png;base64,<data>"
    media_type, data_start = _split_data_uri(uri)
    if data_start < 0:
        raise ValueError(f"a data URI has no comma before its data; {remedy}")
    decoded = urllib.parse.unquote_to_bytes(uri[data_start:])  # even base64 may be percent-encoded
    if media_type.endswith(";base64"):
        try:
            decoded = base64.decodebytes(decoded)
        except ValueError as error:  # binascii.Error: the base64 is cut short or damaged
            raise ValueError(f"a data URI could not be decoded ({error}); {remedy}") from None
    return io.BytesIO(decoded)


def _named(source: str) -> str:
    """The input as an error names it: a URL without its query (a signed URL's token stays out of the
    response), and at most 200 characters of it; a data URI without its data."""
    if is_data_uri(source):  # (a scheme in capitals comes as a string: parse_input)
        return "a data URI"
    return f"the file at {_cut(redact(source), 200)}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
