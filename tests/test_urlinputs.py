"""Inputs given as URLs or data URIs, fetched as Cog's SDK fetches them (requests' streamed response): held to
the byte limit and the deadline, a failed fetch leaves nothing, and a prediction's inputs go when it ends."""

from __future__ import annotations

import http.server
import io
import os
import stat
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
import requests

from cogserver import CogServer, data_uri
from conftest import make_mask, make_photo
from inpaint.urlinputs import GRACE_SECONDS, Downloads


class Host:
    """A real HTTP server on loopback: /photo.png (a photo, with Content-Length), /endless.png (zeros with no
    length, for all a test needs: 256 MiB, so that a regression cannot fill the disk, as Cog's own fetch did),
    /trickle.png (a byte every 0.2 s)."""

    def __init__(self, photo: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if self.path.startswith("/photo.png"):
                    self.send_header("Content-Length", str(len(photo)))
                    self.end_headers()
                    self.wfile.write(photo)
                    return
                self.end_headers()
                try:
                    for _ in range(256 if self.path.startswith("/endless") else 10**6):
                        self.wfile.write(b"\0" * (1 << 20) if self.path.startswith("/endless") else b"\0")
                        self.wfile.flush()
                        if self.path.startswith("/trickle"):
                            time.sleep(0.2)
                except OSError:  # the client hung up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def host(tmp_path):
    with closing(Host(make_photo(tmp_path / "photo.png").read_bytes())) as running:
        yield running


def _response(url: str):
    """The file object Cog's SDK copies from (cog.types.URLFile: requests' raw stream, decoded)."""
    response = requests.get(url, stream=True, timeout=10)
    response.raise_for_status()
    response.raw.decode_content = True
    return response.raw


def test_a_fetch_copies_the_whole_file_into_the_folder(tmp_path, host):
    downloads = Downloads(10 << 20, 30, tmp_path / "in")
    (tmp_path / "in").mkdir()
    fetched = downloads.fetch(_response(f"{host.url}/photo.png"), f"{host.url}/photo.png", "photo.png")
    assert fetched.parent == tmp_path / "in" and fetched.name.endswith("photo.png")
    assert fetched.read_bytes() == (tmp_path / "photo.png").read_bytes()


def test_an_endless_response_stops_at_the_byte_limit_names_the_url_without_its_query_and_leaves_nothing(tmp_path, host):
    (tmp_path / "in").mkdir()
    downloads = Downloads(3 << 20, 30, tmp_path / "in")
    url = f"{host.url}/endless.png?X-Amz-Signature=secret"
    with pytest.raises(ValueError) as refused:
        downloads.fetch(_response(url), url, "endless.png")
    assert str(refused.value) == (f"the file at {host.url}/endless.png (query hidden) is over the limit of 3,145,728 bytes "
                                  "(INPAINT_MAX_UPLOAD_BYTES); send a smaller or compressed image")
    assert list((tmp_path / "in").iterdir()) == []


def test_a_trickle_stops_at_the_deadline_and_leaves_nothing(tmp_path, host):
    (tmp_path / "in").mkdir()
    downloads = Downloads(10 << 20, 1, tmp_path / "in")
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"trickle.png did not arrive within 1 s \(INPAINT_MAX_DOWNLOAD_SECONDS\); send it "
                                         "from a faster host, or upload it"):
        downloads.fetch(_response(f"{host.url}/trickle.png"), f"{host.url}/trickle.png", "trickle.png")
    assert time.monotonic() - started < 3  # each read returns what has arrived: no wait for a whole buffer
    assert list((tmp_path / "in").iterdir()) == []


def test_a_file_of_exactly_the_limit_is_fetched_and_one_byte_more_is_not(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "exact").write_bytes(b"x" * 1000)
    (tmp_path / "over").write_bytes(b"x" * 1001)
    downloads = Downloads(1000, 30, folder)
    with open(tmp_path / "exact", "rb", buffering=0) as raw:  # a raw file has read() alone, no read1()
        assert downloads.fetch(raw, "https://example.com/exact.png", "exact.png").read_bytes() == b"x" * 1000
    with open(tmp_path / "over", "rb") as over, pytest.raises(ValueError, match="is over the limit of 1,000 bytes"):
        downloads.fetch(over, "https://example.com/over.png", "over.png")


def test_by_default_the_files_go_to_a_private_folder_of_their_own_in_the_temporary_folder():
    folder = Downloads(1, 1).folder
    try:
        assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("inpaint-inputs-")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and list(folder.iterdir()) == []
    finally:
        folder.rmdir()


def test_a_data_uri_over_the_limit_is_named_without_its_data(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="^a data URI is over the limit of 10 bytes"):
        Downloads(10, 30, tmp_path / "in").fetch(io.BytesIO(b"x" * 11), "data:image/png;base64," + "eA" * 8, "file.png")


def test_a_predictions_inputs_go_when_it_ends_and_an_abandoned_one_at_the_next_fetch(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    downloads = Downloads(1 << 20, 5, folder)
    image, mask, abandoned = (downloads.fetch(io.BytesIO(b"pixels"), "data:,", name) for name in ("a", "b", "c"))
    elsewhere = make_mask(tmp_path / "mask.png")  # a path of the caller's own is never touched
    long_ago, not_yet = (time.time() - 5 - GRACE_SECONDS + seconds for seconds in (-1, 1))
    with downloads.used(image, None, elsewhere):
        os.utime(image, (long_ago, long_ago))
        os.utime(abandoned, (long_ago, long_ago))
        os.utime(mask, (not_yet, not_yet))  # its other input may still be on its way
        later = downloads.fetch(io.BytesIO(b"pixels"), "data:,", "d")  # sweeps what no run() holds
        assert image.exists() and not abandoned.exists() and mask.exists() and later.exists()
    assert not image.exists() and elsewhere.exists()
    with pytest.raises(RuntimeError), downloads.used(mask):
        raise RuntimeError("a failed prediction")
    assert sorted(folder.iterdir()) == [later]


def test_once_installed_cogs_own_inputs_are_fetched_into_the_folder_once_each(tmp_path, host, monkeypatch):
    """Cog's SDK turns a URL or a data URI given for a Path input into a URLPath (cog.types.Path.validate),
    and its server asks that for its file (convert); installed, that fetch is ours."""
    from cog.types import Path as CogPath
    from cog.types import URLPath

    monkeypatch.setattr(URLPath, "convert", URLPath.convert)  # the SDK's own again after this test
    folder = tmp_path / "in"
    folder.mkdir()
    assert Downloads(1 << 20, 30, folder).install().folder == folder
    photo = (tmp_path / "photo.png").read_bytes()
    for value in (f"{host.url}/photo.png", data_uri(tmp_path / "photo.png")):
        given = CogPath.validate(value)
        assert isinstance(given, URLPath)
        fetched = given.convert()
        assert isinstance(fetched, CogPath) and fetched.parent == folder and fetched.read_bytes() == photo
        assert fetched.name.endswith("photo.png" if value.startswith("http") else ".png")
        assert given.convert() == fetched and len(list(folder.iterdir())) <= 2  # fetched once
    with pytest.raises(ValueError, match=f"^the file at {host.url}/endless.png is over the limit of 1,048,576 bytes"):
        CogPath.validate(f"{host.url}/endless.png").convert()


@pytest.mark.slow
def test_through_the_server_url_inputs_are_held_to_the_limits_and_no_input_file_is_left(tiny_weights, tmp_path, host):
    """Cog's server started with its temporary folder in tmp_path: every file its SDK writes lands there."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    small = {"num_inference_steps": 1, "width": 64, "height": 64}
    env = {"TMPDIR": str(temporary), "INPAINT_MAX_DOWNLOAD_SECONDS": "3", "INPAINT_MAX_UPLOAD_BYTES": str(8 << 20)}
    with CogServer(tiny_weights, log_path=tmp_path / "server.log", env=env) as server:
        (folder,) = temporary.glob("inpaint-inputs-*")
        for inputs in ({"image": f"{host.url}/photo.png", "mask": f"{host.url}/photo.png"},
                       {"image": data_uri(photo), "mask": data_uri(mask)}):
            status, response = server.predict({**inputs, **small})
            assert response["status"] == "succeeded", response.get("error")
            assert list(folder.iterdir()) == []
        for name, expected in (("endless.png", "is over the limit of 8,388,608 bytes (INPAINT_MAX_UPLOAD_BYTES)"),
                               ("trickle.png", "did not arrive within 3 s (INPAINT_MAX_DOWNLOAD_SECONDS)")):
            started = time.monotonic()
            status, response = server.predict({"image": f"{host.url}/{name}", "mask": data_uri(mask), **small})
            assert response["status"] == "failed" and f"the file at {host.url}/{name} {expected}" in response["error"]
            assert time.monotonic() - started < 15
        assert sum(path.stat().st_size for path in folder.iterdir()) < 1 << 20  # at most the masks of those two
        status, response = server.predict({"image": data_uri(photo), "mask": data_uri(mask), **small})
        assert response["status"] == "succeeded"
    # Nothing where Cog's SDK would have left its copies of the inputs (the outputs' folders are inpaint-*).
    assert [path.name for path in temporary.iterdir() if path.is_file()] == []
