"""The photo and mask files Cog's server fetches for a prediction: held to the upload limits, and removed.

An input given as an http(s) URL or a data URI reaches `run()` as a temporary file that Cog's SDK
(0.23.1, `cog.types.URLPath.convert`) wrote with `shutil.copyfileobj`: no cap on its size, none on its
time (requests' timeout is per read), and nobody removes it. So an endless response filled the
disk, one that trickled held a prediction slot for as long as it lasted, and every prediction left its
inputs in /tmp for good. `Downloads.install` replaces that method once, at setup, with the same copy
into a folder of this process's own, held to a byte limit and a deadline (the part-written file of a
copy that fails is removed); `Downloads.used` removes a prediction's inputs once its `run()` ends, and
each fetch removes those of a prediction that never reached `run()` (its other input failed). Cog's
server reports a refused download as an input validation error (tests/test_urlinputs.py).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .weights import redact

# A file in the folder that no run() holds, this long after it was fetched, belongs to a prediction that
# never reached run() (its other input failed): a fetch of the other input could take the deadline.
GRACE_SECONDS = 60.0


class Downloads:
    """The inputs Cog's server fetches in this process, in `folder` (a new private one by default)."""

    def __init__(self, max_bytes: int, max_seconds: float, folder: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.folder = folder or Path(tempfile.mkdtemp(prefix="inpaint-inputs-"))
        self._held: set[Path] = set()  # the inputs of the run() calls going on
        self._lock = threading.Lock()

    def install(self) -> Downloads:
        """From now on, Cog's SDK fetches every URL or data URI input of this process with `fetch`."""
        from cog.types import Path as CogPath
        from cog.types import URLPath

        downloads = self

        def convert(self: URLPath) -> CogPath:
            """The input's content in a file (its path kept, as the SDK's own method keeps it)."""
            if self._path is None:
                self._path = CogPath(downloads.fetch(self.fileobj, self.source, self.filename))
            return self._path

        URLPath.convert = convert
        return self

    def fetch(self, source_file, source: str, filename: str) -> Path:
        """Copy `source_file` (an HTTP response or the bytes of a data URI, from `source`) into a new file in
        the folder whose name ends in `filename`, within the byte limit and the deadline."""
        self._sweep()
        deadline = time.monotonic() + self.max_seconds
        read = getattr(source_file, "read1", source_file.read)  # what has arrived: a trickle meets the deadline
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=filename, delete=False) as dest:
            try:
                copied = 0
                while chunk := read(1 << 20):
                    copied += len(chunk)
                    if copied > self.max_bytes:
                        raise ValueError(f"{_named(source)} is over the limit of {self.max_bytes:,} bytes "
                                         "(INPAINT_MAX_UPLOAD_BYTES); send a smaller or compressed image")
                    if time.monotonic() > deadline:
                        raise ValueError(f"{_named(source)} did not arrive within {self.max_seconds:g} s "
                                         "(INPAINT_MAX_DOWNLOAD_SECONDS); send it from a faster host, or upload it")
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
