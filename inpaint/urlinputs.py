"""The photo and mask files Cog's server fetches for a prediction: held to the upload limits, and removed.

An input given as an http(s) URL or a data URI reaches `run()` as a temporary file that Cog's SDK
(0.23.1, `cog.types.URLPath.convert`) wrote with `shutil.copyfileobj`: no cap on its size, none on its
time (requests' timeout is per read), and nobody removes it. So an endless response filled the
disk, one that trickled held a prediction slot for as long as it lasted, and every prediction left its
inputs in /tmp for good. `Downloads.install` replaces that method once, at setup, with the same copy
into a folder of this process's own, held to a byte limit and a deadline (the part-written file of a
copy that fails is removed); `Downloads.used` removes a prediction's inputs once its `run()` ends, and
each fetch removes those of a prediction that never reached `run()` (its other input failed). An
http(s) URL is fetched through egress.py (allowed addresses only, one deadline headers included), never
by the SDK's own request. Cog's server reports a refused download as an input validation error
(tests/test_urlinputs.py).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from . import egress
from .weights import redact

# A file in the folder that no run() holds, this long after it was fetched, belongs to a prediction that
# never reached run() (its other input failed): a fetch of the other input could take the deadline.
GRACE_SECONDS = 60.0


class Downloads:
    """The inputs Cog's server fetches in this process, in `folder` (a new private one by default)."""

    def __init__(self, max_bytes: int, max_seconds: float, folder: Path | None = None,
                 networks: Sequence[egress.Network] = ()) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.networks = tuple(networks)  # besides public addresses, those an input's URL may reach (egress.py)
        self.folder = folder or Path(tempfile.mkdtemp(prefix="inpaint-inputs-"))
        self._held: set[Path] = set()  # the inputs of the run() calls going on
        self._lock = threading.Lock()

    def install(self) -> Downloads:
        """From now on, Cog's SDK fetches every URL or data URI input of this process with `fetch_input`."""
        from cog.types import Path as CogPath
        from cog.types import URLPath

        downloads = self

        def convert(self: URLPath) -> CogPath:
            """The input's content in a file (its path kept, as the SDK's own method keeps it)."""
            if self._path is None:
                self._path = CogPath(downloads.fetch_input(self.source, self.filename, lambda: self.fileobj))
            return self._path

        URLPath.convert = convert
        return self

    def fetch_input(self, source: str, filename: str, opened: Callable[[], BinaryIO]) -> Path:
        """An input as Cog's SDK hands it over: an http(s) URL is fetched here (never through `opened`, the
        SDK's own unguarded request); a data URI's bytes come from `opened`, decoded already."""
        if urllib.parse.urlsplit(source).scheme in ("http", "https"):  # as cog.types.Path.validate tells them apart
            return self.fetch_url(source, filename)
        return self.fetch(opened(), source, filename)

    def fetch_url(self, url: str, filename: str) -> Path:
        """GET `url` as Cog's SDK would, through egress's guard: allowed addresses only, and one deadline for
        the connections, the headers and the body."""
        deadline = time.monotonic() + self.max_seconds
        agent = os.environ.get("COG_USER_AGENT")  # the SDK sends it when set
        try:
            with egress.get(url, deadline, self.networks, {"User-Agent": agent} if agent else None) as body:
                return self.fetch(body, url, filename, deadline)
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

    def _late(self, source: str) -> ValueError:
        return ValueError(f"{_named(source)} did not arrive within {self.max_seconds:g} s "
                          "(INPAINT_MAX_DOWNLOAD_SECONDS); send it from a faster host, or upload it")

    def fetch(self, source_file: BinaryIO, source: str, filename: str, deadline: float | None = None) -> Path:
        """Copy `source_file` (an HTTP response's body or the bytes of a data URI, from `source`) into a new
        file in the folder whose name ends in `filename`, within the byte limit and the deadline."""
        self._sweep()
        deadline = time.monotonic() + self.max_seconds if deadline is None else deadline
        # What has arrived (read1): a trickle meets the deadline. A raw file has read() alone.
        read = source_file.read1 if hasattr(source_file, "read1") else source_file.read
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=filename, delete=False) as dest:
            try:
                copied = 0
                while chunk := read(1 << 20):
                    copied += len(chunk)
                    if copied > self.max_bytes:
                        raise ValueError(f"{_named(source)} is over the limit of {self.max_bytes:,} bytes "
                                         "(INPAINT_MAX_UPLOAD_BYTES); send a smaller or compressed image")
                    if time.monotonic() > deadline:
                        raise self._late(source)
                    dest.write(chunk)
            except BaseException:
                os.unlink(dest.name)
                raise
        return Path(dest.name)

    @contextmanager
    def used(self, *inputs: Path | None) -> Iterator[None]:
        """A prediction's run() with these inputs: those fetched into the folder are removed when it ends."""
        ours = {Path(path) for path in inputs if path is not None and Path(path).parent == self.folder}
        with self._lock:
            self._held |= ours
        try:
            yield
        finally:
            with self._lock:
                self._held -= ours
            for path in ours:
                path.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Remove the files no run() holds, fetched over the deadline and GRACE_SECONDS ago."""
        oldest = time.time() - self.max_seconds - GRACE_SECONDS
        with self._lock, os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    if Path(entry.path) not in self._held and entry.stat().st_mtime < oldest:
                        os.unlink(entry.path)
                except FileNotFoundError:  # its run() ended meanwhile
                    pass


def _named(source: str) -> str:
    """The input as an error names it: a URL without its query (a signed URL's token stays out of the
    response), a data URI without its data."""
    return "a data URI" if source.startswith("data:") else f"the file at {redact(source)}"
