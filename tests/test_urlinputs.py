"""Inputs given as URLs or data URIs, fetched as Cog's SDK fetches them (requests' streamed response): held to
the byte limit and the deadline, a failed fetch leaves nothing, and a prediction's inputs go when it ends.
What a URL may reach, and how a fetch is cut, is tests/test_egress.py's."""

from __future__ import annotations

import gc
import io
import re
import stat
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cogserver import CogServer, data_uri
from conftest import make_mask, make_photo
from webhost import LOOPBACK

from inpaint.concurrency import CancelToken
from inpaint.urlinputs import Downloads, Pending, data_filename, parse_input


def test_a_fetch_copies_the_whole_file_into_the_folder(tmp_path, host, folder):
    fetched = Downloads(10 << 20, 30, folder, LOOPBACK).fetch_url(f"{host.url}/photo.png", "photo.png")
    assert fetched.parent == folder and fetched.name.endswith("photo.png")
    assert fetched.read_bytes() == (tmp_path / "photo.png").read_bytes()


def test_an_endless_response_stops_at_the_byte_limit_names_the_url_without_its_query_and_leaves_nothing(host, folder):
    url = f"{host.url}/endless.png?X-Amz-Signature=secret"
    with pytest.raises(ValueError) as refused:
        Downloads(3 << 20, 30, folder, LOOPBACK).fetch_url(url, "endless.png")
    assert str(refused.value) == (f"the file at {host.url}/endless.png (query hidden) is over the limit of 3,145,728 bytes "
                                  "(INPAINT_MAX_UPLOAD_BYTES); send a smaller or compressed image")
    assert list(folder.iterdir()) == []


def test_a_gzip_bomb_is_held_to_the_byte_limit_as_it_inflates(host, folder):
    """Sent with Content-Encoding: gzip, a file arrives inflated (as Cog's SDK reads it): the limit is on
    what it inflates to, and reading stops there."""
    with pytest.raises(ValueError, match="bomb.png is over the limit of 8,388,608 bytes"):
        Downloads(8 << 20, 30, folder, LOOPBACK).fetch_url(f"{host.url}/bomb.png", "bomb.png")
    assert list(folder.iterdir()) == []


def test_an_error_status_or_an_unknown_host_is_named_without_the_query(host, folder):
    downloads = Downloads(10 << 20, 5, folder, LOOPBACK)
    with pytest.raises(ValueError) as missing:
        downloads.fetch_url(f"{host.url}/missing.png?token=secret", "missing.png")
    assert str(missing.value) == (f"the file at {host.url}/missing.png (query hidden) answered HTTP 404 Not Found; check "
                                  "the URL (a signed one may have expired), or upload the file itself")
    with pytest.raises(ValueError) as unknown:
        downloads.fetch_url("https://photos.invalid/cat.png?token=secret", "cat.png")  # .invalid: RFC 6761, never resolves
    assert str(unknown.value) == ("the file at https://photos.invalid/cat.png (query hidden) could not be fetched (its "
                                  "host name was not found); check the URL, or upload the file itself")
    with pytest.raises(ValueError, match=r"could not be fetched \(.*[Cc]onnection refused.*\); check the URL") as refused:
        downloads.fetch_url("http://127.0.0.1:9/photo.png?token=secret", "photo.png")  # the discard port: nothing listens
    assert "secret" not in str(refused.value)
    assert list(folder.iterdir()) == []


def test_a_file_of_exactly_the_limit_is_fetched_and_one_byte_more_is_not(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "exact").write_bytes(b"x" * 1000)
    (tmp_path / "over").write_bytes(b"x" * 1001)
    downloads = Downloads(1000, 30, folder)
    with open(tmp_path / "exact", "rb", buffering=0) as raw:  # a raw file has read() alone, no read1()
        assert downloads.copy(raw, "https://example.com/exact.png", "exact.png").read_bytes() == b"x" * 1000
    with open(tmp_path / "over", "rb") as over, pytest.raises(ValueError, match="is over the limit of 1,000 bytes"):
        downloads.copy(over, "https://example.com/over.png", "over.png")


def test_by_default_the_files_go_to_a_private_folder_of_their_own_in_the_temporary_folder_which_goes_with_them():
    downloads = Downloads(1, 1)
    folder = downloads.folder
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("inpaint-inputs-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and list(folder.iterdir()) == []
    (folder / "left.png").write_bytes(b"x")
    del downloads  # as at the process's exit
    gc.collect()
    assert not folder.exists()


def test_a_data_uri_over_the_limit_is_named_without_its_data(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="^a data URI is over the limit of 10 bytes"):
        Downloads(10, 30, tmp_path / "in").copy(io.BytesIO(b"x" * 11), "data:image/png;base64," + "eA" * 8, "file.png")


@pytest.fixture
def installed(monkeypatch):
    """Downloads.install's validate and convert in place of Cog's SDK's own, for this test only."""
    from cog.types import Path as CogPath
    from cog.types import URLPath

    monkeypatch.setattr(URLPath, "convert", URLPath.convert)  # the SDK's own again after this test
    monkeypatch.setattr(CogPath, "validate", CogPath.__dict__["validate"])  # (the classmethod itself)


def given(value: str):
    """An input as Cog's SDK hands it to run(): cog.types.Path.validate, then convert (installed) where that made
    a URLPath. (Cog's server calls validate only for a value that starts with http://, https:// or data:.)"""
    from cog.types import Path as CogPath
    from cog.types import URLPath

    path = CogPath.validate(value)
    return path.convert() if isinstance(path, URLPath) else path


def test_once_installed_cogs_inputs_reach_run_unfetched_and_are_fetched_there_once_each(tmp_path, host, folder,
                                                                                    installed):
    """Cog's SDK turns a URL or a data URI given for a Path input into a URLPath and asks it for its file
    (convert) before run(); installed, that fetches nothing and writes nothing, and run() fetches."""
    from cog.types import Path as CogPath

    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    photo = (tmp_path / "photo.png").read_bytes()
    inputs = [given(f"{host.url}/photo.png"), given(data_uri(tmp_path / "photo.png")), None, tmp_path / "photo.png"]
    assert all(isinstance(path, CogPath) for path in inputs[:2]) and not any(path.exists() for path in inputs[:2])
    assert host.served == [] and list(folder.iterdir()) == []
    with downloads.prediction() as fetched:
        image, mask, nothing, local = fetched.fetch(dict(zip(("image", "mask", "none", "local"), inputs)), CancelToken())
        assert image.parent == folder == mask.parent and image.read_bytes() == photo == mask.read_bytes()
        assert image.name.endswith("file") and mask.name.endswith("file.png") and host.served == ["/photo.png"]
        assert nothing is None and local == tmp_path / "photo.png"  # a path of the caller's own, as it is
    assert list(folder.iterdir()) == [] and local.exists()


@pytest.mark.parametrize("value", ["{photo}", "/etc/passwd", "relative.png", "file://{photo}", "ftp://example.test/x.png"])
def test_a_string_that_is_no_url_is_refused_naming_the_input_and_nothing_is_read(tmp_path, folder, installed, value):
    """Cog's server hands run() a string it does not take for a URL as it is, and it was read as a path on the
    server: a photo there came back painted (reproduced through Cog's server). Cog's HTTP API takes files as URLs.
    Both ways are refused: as Cog's server hands it over (a str), and through Cog's own validate."""
    value = value.format(photo=make_photo(tmp_path / "photo.png"))
    downloads = Downloads(1 << 20, 30, folder).install()
    for given_as in (value, given(value)):
        with pytest.raises(ValueError) as refused, downloads.prediction() as fetched:
            fetched.fetch({"image": given_as, "mask": None}, CancelToken())
        assert str(refused.value) == (f"image: {value!r} is neither an http(s) URL nor a data URI; send the file as "
                                      "one (data:image/png;base64,<data>): a path on the server is not read")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("value", ["", " "])
def test_a_blank_value_is_refused_as_no_file_saying_an_optional_input_can_be_left_out(folder, installed, value):
    """As some clients send an input they leave blank; Cog's server hands it over as it is."""
    with pytest.raises(ValueError) as refused, Downloads(1 << 20, 30, folder).prediction() as fetched:
        fetched.fetch({"image": make_photo(folder.parent / "photo.png"), "mask": value}, CancelToken())
    assert str(refused.value) == ("mask: a blank value is no file; give the file as an http(s) URL or a data "
                                  "URI (data:image/png;base64,<data>), or leave an optional input out")


def test_a_refused_value_is_shown_whole_up_to_100_characters_and_cut_short_past_them():
    for value, shown in (("a" * 100, "a" * 100), ("b" * 101, "b" * 100 + "..."), ("/x.png?token=secret", "/x.png")):
        assert parse_input(value).refused.startswith(f"{shown!r} is neither an http(s) URL nor a data URI")


def test_what_a_string_asks_for_is_read_from_its_scheme_in_either_case():
    assert parse_input("HTTPS://example.test/photo.png") == Pending("HTTPS://example.test/photo.png", "file")
    assert parse_input("http://example.test/photo.png") == Pending("http://example.test/photo.png", "file")
    assert parse_input("DATA:image/png;base64,QUJD") == Pending("DATA:image/png;base64,QUJD", "file.png")
    assert parse_input("/srv/photo.png").refused and parse_input("https://[::1").refused
    for lead in (" ", "\x00\t "):  # what urlsplit strips from a URL's start (WHATWG's C0 controls and space), and no more
        assert parse_input(lead + "data:image/png;base64,QUJD").filename == "file.png"
        assert parse_input(lead + "https://example.test/photo.png").filename == "file"
    assert parse_input("\u3000data:image/png;base64,QUJD").refused  # a space, but not one urlsplit strips


def test_a_data_uri_handed_over_as_a_string_is_decoded(folder):
    """Cog's server hands "DATA:..." (its scheme in capitals) over as a string, as it does "HTTP://..."."""
    with Downloads(1 << 20, 30, folder).prediction() as fetched:
        (image,) = fetched.fetch({"image": "DATA:image/png;base64,QUJD"}, CancelToken())
        assert image.read_bytes() == b"ABC" and image.name.endswith("file.png")


def test_an_input_is_named_in_at_most_200_characters_and_a_data_uri_without_its_data_in_either_case(folder):
    """A message echoed a URL whole (a path can be as long as the request), and a data URI whose scheme was
    in capitals with all its data."""
    long = "http://169.254.169.254/" + "a" * 1000 + ".png"
    with pytest.raises(ValueError, match=rf"^the file at {long[:200]}\.\.\. is not fetched: 169.254.169.254 is a "):
        Downloads(1 << 20, 30, folder).fetch_url(long, "file")
    with pytest.raises(ValueError) as over, Downloads(10, 30, folder).prediction() as fetched:
        fetched.fetch({"mask": "DATA:image/png;base64," + "eA" * 8}, CancelToken())
    assert str(over.value).startswith("mask: a data URI is over the limit of 10 bytes")


def test_cogs_validate_once_installed_hands_a_path_given_in_process_back_as_it_is(tmp_path, folder, installed):
    from cog.types import Path as CogPath

    Downloads(1 << 20, 30, folder).install()
    assert CogPath.validate(tmp_path) is tmp_path


def test_a_malformed_url_is_named_without_its_query_and_a_url_with_its_scheme_in_capitals_is_fetched(host, folder,
                                                                                                      installed):
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    for given_as in ("https://[::1/photo.png?sig=secret", given("https://[::1/photo.png?sig=secret")):
        with pytest.raises(ValueError) as refused, downloads.prediction() as fetched:
            fetched.fetch({"mask": given_as}, CancelToken())
        assert str(refused.value) == "mask: 'https://[::1/photo.png' is not a valid URL (Invalid IPv6 URL); check it"
    with downloads.prediction() as fetched:  # Cog's server hands "HTTP://..." over as a string
        (image,) = fetched.fetch({"image": host.url.replace("http://", "HTTP://") + "/photo.png"}, CancelToken())
        assert image.parent == folder and image.stat().st_size > 0 and host.served == ["/photo.png"]
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("kind", ["data URI", "DATA URI", "path", "URL"])
def test_a_long_input_leaves_no_copy_of_itself_behind_once_its_prediction_is_over(folder, installed, kind):
    """urlsplit keeps every string it splits, and its parts, in a cache of 128: each data URI it was given stayed
    in memory twice over after its prediction (through Cog's server: about 25 MiB more a prediction, for 24 predictions
    of 7 MiB URIs). A data URI is now told by its start, and a string longer than a URL may be is refused."""
    import base64
    import tracemalloc

    size = 4 << 20
    downloads = Downloads(8 << 20, 30, folder).install()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(3):
            body = base64.b64encode(bytes([index]) * size).decode()
            value = {"data URI": "data:image/png;base64," + body, "DATA URI": "DATA:image/png;base64," + body,
                     "path": "/" + body, "URL": "https://example.test/" + body}[kind]
            for given_as in (value, given(value)):
                try:
                    with downloads.prediction() as fetched:
                        fetched.fetch({"image": given_as}, CancelToken())
                except ValueError as refused:
                    assert kind in ("path", "URL") and "characters long, over the 65,536 a URL may have" in str(refused)
                else:
                    assert kind.lower() == "data uri"
            del body, value, given_as, fetched
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert left < size // 8, f"{left:,} bytes left behind"
    assert list(folder.iterdir()) == []


def test_a_url_is_refused_past_65536_characters_and_fetched_up_to_them(host, folder):
    url = f"{host.url}/photo.png?pad="
    for length, refused in ((65536, False), (65537, True)):
        value = url + "x" * (length - len(url))
        with Downloads(1 << 20, 30, folder, LOOPBACK).prediction() as fetched:
            if refused:
                with pytest.raises(ValueError) as long:
                    fetched.fetch({"image": value}, CancelToken())
                assert str(long.value) == (f"image: '{host.url}/photo.png' is 65,537 characters long, over the 65,536 "
                                           "a URL may have here; send the file itself as a data URI "
                                           "(data:image/png;base64,<data>)")
            else:
                (image,) = fetched.fetch({"image": value}, CancelToken())
                assert image.stat().st_size > 0
    assert [path.partition("?")[0] for path in host.served] == ["/photo.png"]  # (the server keeps the query)


@pytest.mark.parametrize("value, reason", [
    ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAA", "could not be decoded (Incorrect padding)"),  # cut short
    ("data:image/png;base64", "has no comma before its data")])
def test_a_damaged_data_uri_fails_its_prediction_naming_the_input_and_what_to_send(folder, installed, value, reason):
    """Cog's SDK decoded a data URI before run(), and a damaged one failed with base64's bare words and no input
    named ("Input validation error: Incorrect padding", through Cog's server): it is decoded in run() now."""
    downloads = Downloads(1 << 20, 30, folder).install()
    mask = given(value)  # Cog's validate and convert: nothing decoded yet, so nothing refused
    with pytest.raises(ValueError) as failed, downloads.prediction() as fetched:
        fetched.fetch({"image": None, "mask": mask}, CancelToken())
    assert str(failed.value) == f"mask: a data URI {reason}; send the whole file in base64, as data:image/png;base64,<data>"
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("uri", ["data:image/png;base64,iVBO", "data:image/jpeg;base64,/9j/", "data:image/webp;base64,UklG",
                                 "data:IMAGE/PNG;base64,iVBO", "data:image/tiff;name=photo.tif;base64,SUkq", "data:,hello",
                                 "data:;base64,QUJD", "data:text/plain;charset=utf-8,hi", "data:application/x-unknown,1",
                                 "data:image/png,a,b", "data:image/png,a:b", "data:image/png;base64;x=1,QUJD"])
def test_a_data_uris_file_is_named_as_cogs_sdk_names_it_without_decoding_it(uri):
    from cog.types import get_filename

    assert data_filename(uri) == get_filename(uri)


@pytest.mark.parametrize("uri", ["data:image/png;base64,iVBORw0KGgo=", "data:,hello%20world", "data:;base64,QUJD",
                                 "data:image/png;base64,QU%4aD", "data:image/png;base64,!!QU JD\n", "data:text/plain,a,b:c",
                                 "data:image/png;base64,QUJ"])
def test_a_data_uri_is_decoded_as_cogs_sdk_decodes_it(folder, installed, uri):
    """The bytes urllib.request's data: handler gives (Cog's SDK decodes with it), or its error with the
    input named: percent-encoding, characters outside base64's alphabet skipped, a comma in the data."""
    try:
        with urllib.request.urlopen(uri) as response:
            expected = response.read()
    except ValueError as error:
        expected = error
    with Downloads(1 << 20, 30, folder).install().prediction() as fetched:
        if isinstance(expected, bytes):
            assert fetched.fetch({"image": given(uri)}, CancelToken())[0].read_bytes() == expected
        else:
            with pytest.raises(ValueError, match=rf"^image: a data URI could not be decoded \({re.escape(str(expected))}\)"):
                fetched.fetch({"image": given(uri)}, CancelToken())


def test_the_user_agent_is_cogs_when_the_deployment_sets_one(host, folder, monkeypatch):
    """COG_USER_AGENT, which Cog's SDK sends when it is set (cog.types.URLFile); else requests' own."""
    downloads = Downloads(10 << 20, 5, folder, LOOPBACK)
    downloads.fetch_url(f"{host.url}/photo.png", "photo.png")
    monkeypatch.setenv("COG_USER_AGENT", "cog-worker/0.23.1 (inpainting)")
    downloads.fetch_url(f"{host.url}/photo.png", "photo.png")
    assert host.agents[0].startswith("python-requests/") and host.agents[1] == "cog-worker/0.23.1 (inpainting)"


def test_an_input_fetched_once_its_prediction_was_cut_ends_at_once_naming_it(host, folder, installed):
    """A fetch whose thread starts only after the other input failed is cut as it starts."""
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^image: the file at .*/trickle.png did not arrive within 30 s"), \
            downloads.prediction() as fetched:
        fetched.cut()
        fetched.fetch({"image": given(f"{host.url}/trickle.png")}, CancelToken())
    assert time.monotonic() - started < 1 and list(folder.iterdir()) == []
    with pytest.raises(ValueError, match=r"^mask: a data URI is over the limit of 10 bytes"), \
            Downloads(10, 30, folder).install().prediction() as fetched:
        fetched.fetch({"image": None, "mask": given("data:image/png;base64," + "eA" * 8)}, CancelToken())


def test_a_predictions_files_are_removed_when_it_ends_whatever_the_outcome(tmp_path, host, folder, installed):
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    with pytest.raises(RuntimeError), downloads.prediction() as fetched:
        fetched.fetch({"image": given(f"{host.url}/photo.png")}, CancelToken())
        assert len(list(folder.iterdir())) == 1
        raise RuntimeError("a failed prediction")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("failing, message", [
    ("missing.png", "answered HTTP 404 Not Found"), ("endless.png", "is over the limit of 1,048,576 bytes")])
def test_the_first_input_that_fails_cuts_the_other_at_once_and_leaves_nothing(host, folder, installed, failing,
                                                                                message):
    """Before, the other input of a prediction whose mask failed went on to its end and stayed on disk
    (docs/serving.md, "Input files"); the server test below sends such requests for a while."""
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"^mask: the file at {host.url}/{failing} {message}"), \
            downloads.prediction() as fetched:
        fetched.fetch({"image": given(f"{host.url}/trickle.png"), "mask": given(f"{host.url}/{failing}")}, CancelToken())
    assert time.monotonic() - started < 2  # not the trickle's 30 s deadline
    assert list(folder.iterdir()) == []


def test_a_cancel_cuts_the_fetches_and_leaves_nothing(host, folder, installed):
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    started = time.monotonic()
    with pytest.raises(ValueError), downloads.prediction() as fetched:
        token = CancelToken()
        threading.Timer(0.3, token.cancel).start()  # as run_cancellable sets it when Cog cancels the prediction
        fetched.fetch({"image": given(f"{host.url}/trickle.png"), "mask": given(f"{host.url}/slow-headers.png")}, token)
    assert time.monotonic() - started < 1.5
    assert list(folder.iterdir()) == []


def test_a_cancel_cuts_a_name_lookup_that_gets_no_answer(host, folder, installed, unanswered):
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK).install()
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^(image|mask): .* did not arrive within 30 s"), \
            downloads.prediction() as fetched:
        token = CancelToken()
        threading.Timer(0.3, token.cancel).start()
        fetched.fetch({"image": given(f"{host.url}/trickle.png"),
                       "mask": given("http://unanswered.example.test/mask.png")}, token)
    assert time.monotonic() - started < 1.5 and list(folder.iterdir()) == []


@pytest.mark.slow
def test_through_the_server_url_inputs_are_held_to_the_limits_and_no_input_file_is_left(tiny_weights, tmp_path, host,
                                                                                        webhook):
    """Cog's server started with its temporary folder in tmp_path: every file its SDK writes lands there."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    small = {"num_inference_steps": 1, "width": 64, "height": 64}
    env = {"TMPDIR": str(temporary), "INPAINT_MAX_DOWNLOAD_SECONDS": "3", "INPAINT_MAX_UPLOAD_BYTES": str(8 << 20),
           "INPAINT_URL_ALLOW_NETWORKS": "127.0.0.1"}
    with CogServer(tiny_weights, log_path=tmp_path / "server.log", env=env) as server:
        (folder,) = temporary.glob("inpaint-inputs-*")
        for inputs in ({"image": f"{host.url}/photo.png", "mask": f"{host.url}/photo.png"},
                       {"image": data_uri(photo), "mask": data_uri(mask)}):
            status, response = server.predict({**inputs, **small})
            assert response["status"] == "succeeded", response.get("error")
            assert list(folder.iterdir()) == []
        port = host.url.rsplit(":", 1)[1]
        for url, expected in ((f"{host.url}/endless.png", "is over the limit of 8,388,608 bytes (INPAINT_MAX_UPLOAD_BYTES)"),
                              (f"{host.url}/trickle.png", "did not arrive within 3 s (INPAINT_MAX_DOWNLOAD_SECONDS)"),
                              (f"{host.url}/slow-headers.png", "did not arrive within 3 s (INPAINT_MAX_DOWNLOAD_SECONDS)"),
                              ("http://169.254.169.254/latest/meta-data/iam/photo.png",
                               "is not fetched: 169.254.169.254 is a link-local address, and this deployment fetches from "
                               "public addresses only (and the networks INPAINT_URL_ALLOW_NETWORKS lists)"),
                              (f"http://127.0.0.2:{port}/photo.png", "is not fetched: 127.0.0.2 is a loopback address")):
            started = time.monotonic()
            status, response = server.predict({"image": url, "mask": data_uri(mask), **small})
            assert response["status"] == "failed" and f"image: the file at {url} {expected}" in response["error"], \
                response.get("error")
            assert time.monotonic() - started < 15
            assert list(folder.iterdir()) == []
        # A path on the server: before, Cog's server handed it to run() as it was, and the photo came back painted.
        status, response = server.predict({"image": str(photo), "mask": data_uri(mask), **small})
        assert response["status"] == "failed" and (f"image: {str(photo)!r} is neither an http(s) URL nor a data URI; "
                                                   "send the file as one") in response["error"], response.get("error")
        # A data URI cut short: before, Cog's SDK decoded it ahead of run() ("Input validation error: Incorrect padding").
        status, response = server.predict({"image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAA",
                                           "mask": data_uri(mask), **small})
        assert response["status"] == "failed" and ("image: a data URI could not be decoded (Incorrect padding); send the "
                                                   "whole file in base64") in response["error"], response.get("error")
        # A prediction whose mask fails while its image arrives: before, the image stayed on disk until a later
        # fetch swept it, two minutes on (docs/serving.md, "Input files"). Three clients at once, for a few seconds.
        def abandon() -> int:
            count, end = 0, time.monotonic() + 5
            while time.monotonic() < end:
                status, response = server.predict({"image": f"{host.url}/photo.png", "mask": f"{host.url}/missing.png",
                                                   **small})
                assert response["status"] == "failed" and "mask: the file at" in response["error"]
                assert "missing.png answered HTTP 404 Not Found" in response["error"]
                count += 1
            return count

        with ThreadPoolExecutor(3) as clients:
            assert sum(clients.map(lambda _: abandon(), range(3))) > 10
        assert list(folder.iterdir()) == []
        # A cancel while an input trickles in: the fetch is the prediction's own, so the cancel cuts it.
        status, response = server.request("POST", "/predictions", {
            "id": "cancel-fetch", "input": {"image": f"{host.url}/trickle.png", "mask": data_uri(mask), **small},
            "webhook": webhook.url}, {"Prefer": "respond-async"})
        assert status == 202, response
        while "/trickle.png" not in host.served:
            time.sleep(0.05)
        time.sleep(0.5)  # past coglet's windows at a prediction's start, where a cancel never reaches run() (docs/serving.md)
        started = time.monotonic()
        assert server.request("POST", "/predictions/cancel-fetch/cancel")[0] == 200
        final = webhook.wait_for(lambda event: event.get("status") in ("canceled", "succeeded", "failed"), timeout=10)
        assert final["status"] == "canceled" and time.monotonic() - started < 2, final.get("error")  # not the 3 s deadline
        deadline = time.monotonic() + 2  # the final webhook can come a moment before run() has ended and cleaned up
        while list(folder.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(folder.iterdir()) == []
        status, response = server.predict({"image": data_uri(photo), "mask": data_uri(mask), **small})
        assert response["status"] == "succeeded"
    # Nothing where Cog's SDK would have left its copies of the inputs, and once the server has stopped, neither
    # the inputs' folder nor the outputs' (inpaint-*): before, each stop left its last half-minute of outputs.
    assert list(temporary.iterdir()) == []
