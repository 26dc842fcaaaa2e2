"""Inputs given as URLs or data URIs, fetched as Cog's SDK fetches them (requests' streamed response): held to
the byte limit and the deadline, a failed fetch leaves nothing, and a prediction's inputs go when it ends."""

from __future__ import annotations

import gc
import gzip
import http.server
import io
import ipaddress
import re
import socket
import stat
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
import requests
from urllib3.connection import HTTPConnection

from cogserver import CogServer, data_uri
from conftest import make_mask, make_photo

from inpaint import egress
from inpaint.concurrency import CancelToken
from inpaint.config import Settings
from inpaint.urlinputs import Downloads


# Loopback is not public: the tests' hosts are reached as a deployment's own networks are, by listing them.
LOOPBACK = Settings(url_allow_networks="127.0.0.0/8").url_networks


class Host:
    """A real HTTP server on loopback (127.0.0.1, or another address of 127/8):
    /photo.png (a photo, with Content-Length); /endless.png (zeros with no length, for all a test needs:
    256 MiB, so that a regression cannot fill the disk, as Cog's own fetch did); /trickle.png (a byte every
    0.2 s); /slow-headers.png (a header line every 0.2 s, for 8 s, before any body); /stall.png (a length of
    1,000 bytes, 10 of them sent, then nothing for 30 s); /bomb.png (Content-Encoding: gzip, 64 KiB that
    inflate to 64 MiB of zeros); /missing.png (404); /moved.png?to=URL (302 to URL); /loop.png (302 to itself); /hangup.png (the
    connection closed, no answer). `served` lists the paths asked for, `agents` their User-Agent headers."""

    def __init__(self, photo: bytes, address: str = "127.0.0.1") -> None:
        served, agents = self.served, self.agents = [], []
        bomb = gzip.compress(bytes(64 << 20), compresslevel=9)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.append(self.path)
                agents.append(self.headers.get("User-Agent"))
                target = urllib.parse.urlsplit(self.path)  # a proxy is sent the absolute URL
                try:
                    self._answer(target.path, urllib.parse.parse_qs(target.query))
                except OSError:  # the client hung up
                    pass

            def _answer(self, path, query):
                if path == "/hangup.png":  # closes the connection without a word
                    self.close_connection = True
                    return
                if path == "/missing.png":
                    self.send_error(404)
                    return
                if path in ("/moved.png", "/loop.png"):
                    self.send_response(302)
                    self.send_header("Location", query["to"][0] if path == "/moved.png" else "/loop.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if path == "/slow-headers.png":
                    self.flush_headers()  # the status line, then a header at a time
                    for number in range(40):
                        self.wfile.write(f"X-Slow-{number}: 1\r\n".encode())
                        self.wfile.flush()
                        time.sleep(0.2)
                if path in ("/photo.png", "/bomb.png", "/stall.png", "/slow-headers.png"):
                    body = bomb if path == "/bomb.png" else photo
                    if path == "/bomb.png":
                        self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(1000 if path == "/stall.png" else len(body)))
                    self.end_headers()
                    self.wfile.write(body[:10] if path == "/stall.png" else body)
                    self.wfile.flush()
                    if path == "/stall.png":
                        time.sleep(30)
                    return
                self.end_headers()
                for _ in range(256 if path == "/endless.png" else 10**6):
                    self.wfile.write(b"\0" * (1 << 20) if path == "/endless.png" else b"\0")
                    self.wfile.flush()
                    if path == "/trickle.png":
                        time.sleep(0.2)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def host(tmp_path):
    with closing(Host(make_photo(tmp_path / "photo.png").read_bytes())) as running:
        yield running


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in").mkdir()
    return tmp_path / "in"


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


@pytest.mark.parametrize("name", ["trickle.png", "slow-headers.png", "stall.png"])
def test_a_host_that_trickles_or_stalls_is_cut_at_the_deadline_headers_included_and_leaves_nothing(host, folder, name):
    """A body a byte at a time, headers a line at a time (requests' timeout is per read, so before this a
    2 s deadline took 8 s, and any time a host liked), and a body that stops halfway (which waited for the
    read timeout)."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"{name} did not arrive within 1 s \(INPAINT_MAX_DOWNLOAD_SECONDS\); send it "
                                         "from a faster host, or upload it"):
        Downloads(10 << 20, 1, folder, LOOPBACK).fetch_url(f"{host.url}/{name}", name)
    assert time.monotonic() - started < 2
    assert list(folder.iterdir()) == []


def test_a_tls_host_that_stalls_is_cut_at_the_deadline(https, folder, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https.cert))  # requests' own variable for a deployment's CA

    def stalled():
        yield b"\x89PNG"
        time.sleep(30)

    https.routes["/stall.png"] = (200, {}, stalled())
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"stall.png did not arrive within 1 s"):
        Downloads(10 << 20, 1, folder, LOOPBACK).fetch_url(f"{https.url}/stall.png", "stall.png")
    assert time.monotonic() - started < 2 and https.requests == ["/stall.png"]
    https.routes["/photo.png"] = (200, {}, b"\x89PNG pixels")  # the same guard, not cut: the whole file
    assert Downloads(10 << 20, 5, folder, LOOPBACK).fetch_url(f"{https.url}/photo.png", "photo.png").read_bytes() == b"\x89PNG pixels"


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


def test_a_host_that_hangs_up_or_whose_certificate_is_not_trusted_is_named_with_the_reason(host, https, folder):
    """The innermost cause of requests' and urllib3's wrappers, in a few words: what the user can act on."""
    downloads = Downloads(10 << 20, 5, folder, LOOPBACK)
    with pytest.raises(ValueError) as hung_up:
        downloads.fetch_url(f"{host.url}/hangup.png?token=secret", "hangup.png")
    assert str(hung_up.value) == (f"the file at {host.url}/hangup.png (query hidden) could not be fetched "
                                  "(RemoteDisconnected: Remote end closed connection without response); check the URL, "
                                  "or upload the file itself")
    https.routes["/photo.png"] = (200, {}, b"\x89PNG")  # its certificate is not requests' to trust (no REQUESTS_CA_BUNDLE)
    with pytest.raises(ValueError, match=r"^the file at https://127.0.0.1:\d+/photo.png could not be fetched "
                                         r"\(SSLCertVerificationError: .*certificate verify failed: self.signed certificate"):
        downloads.fetch_url(f"{https.url}/photo.png", "photo.png")
    assert https.requests == [] and list(folder.iterdir()) == []


@pytest.fixture
def silent():
    """A port that never answers a connection: a listening socket whose one-place queue (backlog 0) is held
    full, so that Linux drops every further SYN and a connect waits out its timeout."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server, socket.create_connection(server.getsockname()):
        yield server.getsockname()[1]  # the connection above fills the queue


def test_a_host_that_never_answers_the_connection_is_cut_at_the_deadline_or_named_at_the_connect_timeout(silent, folder):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"silent.png did not arrive within 1 s"):
        Downloads(1 << 20, 1, folder, LOOPBACK).fetch_url(f"http://127.0.0.1:{silent}/silent.png", "silent.png")
    assert 0.9 < time.monotonic() - started < 2
    guard = egress.Guard(time.monotonic() + 30, LOOPBACK)  # requests' connect timeout comes first
    with pytest.raises(egress.FetchError, match=r"^no answer from 127.0.0.1$"):
        guard.connect(HTTPConnection("127.0.0.1", silent, timeout=0.3))
    assert list(folder.iterdir()) == []


def test_a_host_that_stops_answering_short_of_the_deadline_is_named_so(host):
    """A read timeout (requests', Cog's SDK's 10 s; here shorter) that comes before the deadline."""
    guard = egress.Guard(time.monotonic() + 30, LOOPBACK)
    started = time.monotonic()
    with pytest.raises(egress.FetchError, match=r"^its host stopped answering$"), guard, \
            egress.get(f"{host.url}/stall.png", guard, timeout=0.3) as body:
        while body.read1(1 << 20):
            pass
    assert time.monotonic() - started < 2 and not guard.expired


def test_a_failure_is_named_by_its_innermost_cause():
    guard = egress.Guard(time.monotonic() + 30, ())
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as cause:
            raise requests.ConnectionError("HTTPConnectionPool(host=...): Max retries exceeded") from cause
    except requests.ConnectionError as wrapped:
        assert str(guard.failure(wrapped)) == "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert str(guard.failure(ConnectionAbortedError())) == "ConnectionAbortedError"  # no message: the type alone
    guard.cut()
    assert isinstance(guard.failure(ConnectionAbortedError()), egress.Late)  # once cut, whatever broke


def test_a_connection_is_made_as_urllib3_makes_it_within_the_deadline(host):
    """TCP_NODELAY, urllib3's socket option, set; a guard past its deadline connects to nothing."""
    port = int(host.url.rsplit(":", 1)[1])
    with closing(egress.Guard(time.monotonic() + 5, LOOPBACK).connect(HTTPConnection("127.0.0.1", port))) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) and sock.getpeername() == ("127.0.0.1", port)
    with pytest.raises(egress.Late):
        egress.Guard(time.monotonic() - 1, LOOPBACK).connect(HTTPConnection("127.0.0.1", port))
    with pytest.raises(egress.FetchError, match=r"^could not connect to 127.0.0.1: Connection refused$"):
        egress.Guard(time.monotonic() + 5, LOOPBACK).connect(HTTPConnection("127.0.0.1", 9))  # the discard port


def resolver(answers: dict[str, list[str]]):
    """socket.getaddrinfo for the names in `answers`, in the 5-tuples Python documents for it (family, type,
    proto, canonname, sockaddr), as a DNS server that holds those records would have it answered."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host not in answers:
            return real(host, port, family, type, proto, flags)
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (address, port, 0, 0) if ":" in address else (address, port)) for address in answers[host]]

    return getaddrinfo


def test_a_name_with_several_addresses_is_fetched_from_an_allowed_one_and_refused_when_none_is(host, folder, monkeypatch):
    """A name whose records hold the metadata service first and the image host second: the connection goes to
    the second, the first never tried; with no address allowed, every one is named."""
    monkeypatch.setattr(socket, "getaddrinfo", resolver({"images.example.test": ["169.254.169.254", "127.0.0.1"],
                                                         "internal.example.test": ["169.254.169.254", "10.0.0.1"]}))
    port = host.url.rsplit(":", 1)[1]
    fetched = Downloads(10 << 20, 5, folder, LOOPBACK).fetch_url(f"http://images.example.test:{port}/photo.png", "photo.png")
    assert fetched.stat().st_size > 0 and host.served == ["/photo.png"]
    with pytest.raises(ValueError, match=r"is not fetched: internal.example.test resolves to 169.254.169.254 "
                                         r"\(link-local\), 10.0.0.1 \(private\), and this deployment"):
        Downloads(10 << 20, 5, folder).fetch_url(f"http://internal.example.test:{port}/photo.png", "photo.png")
    with pytest.raises(ValueError, match=r"could not connect to images.example.test at 127.0.0.1: Connection refused"):
        Downloads(10 << 20, 5, folder, LOOPBACK).fetch_url("http://images.example.test:9/photo.png", "photo.png")


@pytest.fixture
def unanswered(monkeypatch):
    """socket.getaddrinfo for a name whose DNS server does not answer: it blocks (glibc's for `timeout` times
    `attempts` for each server resolv.conf(5) lists; here until `release` is set, or the test ends), then
    fails with EAI_AGAIN ("Temporary failure in name resolution"). Other names are the real one's."""
    real, release = socket.getaddrinfo, threading.Event()

    def getaddrinfo(host, port, *args):
        if host != "unanswered.example.test":
            return real(host, port, *args)
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield release
    release.set()


def test_a_name_lookup_that_gets_no_answer_is_cut_at_the_deadline_and_named_when_it_fails_short_of_it(folder,
                                                                                                      unanswered):
    """getaddrinfo cannot be interrupted: before, a lookup held the fetch for the resolver's timeouts,
    past the deadline (docs/serving.md, "Input files")."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^the file at http://unanswered.example.test/photo.png did not arrive "
                                         r"within 1 s \(INPAINT_MAX_DOWNLOAD_SECONDS\)"):
        Downloads(1 << 20, 1, folder).fetch_url("http://unanswered.example.test/photo.png", "photo.png")
    assert 0.9 < time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(egress.Late):  # a guard outside a with block (no timer to cut it) still keeps its deadline
        egress.Guard(time.monotonic() + 0.3, ()).connect(HTTPConnection("unanswered.example.test", 80))
    assert time.monotonic() - started < 0.9
    threading.Timer(0.2, unanswered.set).start()  # the resolver gives up first
    with pytest.raises(ValueError) as failed:
        Downloads(1 << 20, 30, folder).fetch_url("http://unanswered.example.test/photo.png", "photo.png")
    assert str(failed.value) == ("the file at http://unanswered.example.test/photo.png could not be fetched (the DNS "
                                 "did not answer for its host name); check the URL, or upload the file itself")
    assert list(folder.iterdir()) == []


def test_lookups_left_to_a_resolver_that_does_not_answer_are_bounded_and_a_fetch_waits_for_one_within_its_deadline(
        host, folder, unanswered):
    """A cut fetch leaves its lookup to the resolver: a client that sent and cancelled requests for names
    that never resolve would leave a thread each. At most LOOKUPS_AT_ONCE are under way in a Downloads."""
    downloads = Downloads(1 << 20, 30, folder, LOOPBACK)

    def resolving() -> int:  # (daemon threads: one the resolver holds does not hold up the process's exit)
        return sum(thread.name == "inpaint-resolve" and thread.daemon for thread in threading.enumerate())

    before = resolving()
    for _ in range(egress.LOOKUPS_AT_ONCE + 8):
        guard = downloads.guard()
        threading.Timer(0.05, guard.cut).start()  # as a cancel cuts it
        with pytest.raises(ValueError, match="did not arrive within 30 s"):
            downloads.fetch_url("http://unanswered.example.test/photo.png", "photo.png", guard)
    assert resolving() - before == egress.LOOKUPS_AT_ONCE
    started = time.monotonic()
    with pytest.raises(egress.Late):  # all taken: it waits, then its deadline passes
        egress.Guard(time.monotonic() + 0.5, LOOPBACK, downloads.lookups).connect(HTTPConnection("localhost", 80))
    assert 0.4 < time.monotonic() - started < 1.5
    unanswered.set()  # the resolver gives up on them: each frees its place
    while resolving() > before and time.monotonic() - started < 10:
        time.sleep(0.01)
    assert resolving() == before
    port = host.url.rsplit(":", 1)[1]
    assert downloads.fetch_url(f"http://localhost:{port}/photo.png", "photo.png").stat().st_size > 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/photo.png", "http://localhost:{port}/photo.png",
                                 "http://[::ffff:127.0.0.1]:{port}/photo.png", "http://0.0.0.0:{port}/photo.png",
                                 "HTTP://127.1:{port}/photo.png", "http://2130706433:{port}/photo.png"])
def test_by_default_a_url_at_a_non_public_address_is_refused_before_a_byte_is_sent(host, folder, url):
    """The server's own loopback (under each of its spellings: a name, an IPv4-mapped IPv6 address,
    0.0.0.0, which Linux connects to this host, a short or decimal IPv4), as the cloud's metadata service
    or a cluster's services would be: refused, and the host never asked."""
    url = url.format(port=host.url.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match=r"is not fetched: .* (is a|resolves to .*\() ?(loopback|unspecified).*, and this "
                                         r"deployment fetches from public addresses only \(and the networks "
                                         r"INPAINT_URL_ALLOW_NETWORKS lists\)\. Give a URL on the public internet, or upload "
                                         r"the file itself$"):
        Downloads(10 << 20, 5, folder).fetch_url(url, "photo.png")
    assert host.served == [] and list(folder.iterdir()) == []
    if "[" in url:  # the message names an IPv6 literal's URL as written, brackets kept
        with pytest.raises(ValueError, match=rf"^the file at {re.escape(url)} is not fetched"):
            Downloads(10 << 20, 5, folder).fetch_url(url, "photo.png")


def test_a_redirect_to_an_address_not_allowed_is_refused_before_a_byte_is_sent_to_it(tmp_path, folder):
    """Allowed: 127.0.0.1 alone. Its host redirects to another address of the loopback network (Linux
    answers on all of 127/8): each connection is checked where it is made, so the redirect is too."""
    photo = make_photo(tmp_path / "photo.png").read_bytes()
    with closing(Host(photo, "127.0.0.1")) as allowed, closing(Host(photo, "127.0.0.2")) as other:
        downloads = Downloads(10 << 20, 5, folder, Settings(url_allow_networks="127.0.0.1").url_networks)
        target = urllib.parse.quote(f"{other.url}/photo.png", safe="")
        with pytest.raises(ValueError, match=r"is not fetched: 127.0.0.2 is a loopback address, and this deployment"):
            downloads.fetch_url(f"{allowed.url}/moved.png?to={target}", "photo.png")
        assert allowed.served == [f"/moved.png?to={target}"] and other.served == []
        other_allowed = Downloads(10 << 20, 5, folder, Settings(url_allow_networks="127.0.0.1,127.0.0.2").url_networks)
        assert other_allowed.fetch_url(f"{allowed.url}/moved.png?to={target}", "photo.png").read_bytes() == photo


def test_a_redirect_loop_or_a_redirect_to_a_local_file_is_refused_by_name(host, folder):
    downloads = Downloads(10 << 20, 5, folder, LOOPBACK)
    with pytest.raises(ValueError, match=r"could not be fetched \(TooManyRedirects: Exceeded 30 redirects.\)"):
        downloads.fetch_url(f"{host.url}/loop.png", "loop.png")
    local = f"{host.url}/moved.png?to=" + urllib.parse.quote("file:///etc/passwd", safe="")
    with pytest.raises(ValueError, match=r"could not be fetched \(InvalidSchema: No connection adapters were found"):
        downloads.fetch_url(local, "moved.png")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("address, kind", [
    ("169.254.169.254", "link-local"),  # AWS, GCP and Azure's metadata service
    ("fd00:ec2::254", "private"),  # AWS's metadata service over IPv6 (a unique local address)
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),  # RFC 1918
    ("100.64.0.1", "shared"),  # RFC 6598, carrier-grade NAT (and some clusters' pod networks)
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("fe80::1", "link-local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "private"),
    ("192.0.2.1", "private"), ("198.18.0.1", "private"),  # documentation and benchmarking ranges
    ("::ffff:169.254.169.254", "link-local"), ("64:ff9b::a9fe:a9fe", "link-local"),  # IPv4 inside IPv6 (mapped, NAT64)
])
def test_addresses_that_are_not_public_in_ianas_registries_are_refused(address, kind):
    """IANA's IPv4 and IPv6 special-purpose address registries (RFC 6890): what is not globally reachable."""
    parsed = ipaddress.ip_address(address)
    assert not egress.allowed(parsed, ()) and egress.kind(parsed) == kind


@pytest.mark.parametrize("address", ["192.0.0.8", "192.0.0.170", "64:ff9b:1::a9fe:a9fe", "3fff::1", "5f00::1"])
def test_blocks_newer_than_pythons_own_table_are_refused_on_every_python(address):
    """Not globally reachable in IANA's registries: IPv4 dummy and NAT64 discovery addresses (RFC 7600, 7050),
    local-use NAT64 (RFC 8215; it reaches the local network's IPv4), IPv6 documentation (RFC 9637) and SRv6
    SIDs (RFC 9602). Python 3.12.1's ipaddress calls them global; 3.12.4 learnt most of them."""
    assert not egress.allowed(ipaddress.ip_address(address), ())


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address):
    assert egress.allowed(ipaddress.ip_address(address), ())


def test_the_listed_networks_are_allowed_and_nothing_else_of_them():
    networks = Settings(url_allow_networks="10.0.0.0/8, fd00:ec2::/32").url_networks
    for address in ("10.1.2.3", "::ffff:10.1.2.3", "fd00:ec2::1"):
        assert egress.allowed(ipaddress.ip_address(address), networks), address
    for address in ("11.0.0.0", "192.168.1.1", "169.254.169.254", "fd00:ec3::1", "::ffff:192.168.1.1"):
        assert egress.allowed(ipaddress.ip_address(address), networks) == ipaddress.ip_address(address).is_global


def test_a_malformed_network_list_stops_setup_naming_the_setting():
    with pytest.raises(ValueError, match=r"INPAINT_URL_ALLOW_NETWORKS='10.0.0.0/33' must list networks as CIDRs"):
        Settings.from_env({"INPAINT_URL_ALLOW_NETWORKS": "10.0.0.0/33"})


def test_through_an_http_proxy_the_proxy_fetches_and_its_own_rules_apply(tmp_path, folder, monkeypatch):
    """HTTP_PROXY, as requests reads it: the connection goes to the proxy (here on loopback, not listed), which
    is sent the absolute URL (RFC 9112, 3.2.2) and answers for the host. The deployment chose the proxy, so its
    address is not checked; the proxy decides what it fetches."""
    photo = make_photo(tmp_path / "photo.png").read_bytes()
    with closing(Host(photo)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        fetched = Downloads(10 << 20, 5, folder).fetch_url("http://images.example.com/photo.png", "photo.png")
        assert fetched.read_bytes() == photo and proxy.served == ["http://images.example.com/photo.png"]


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
    """Downloads.install's convert in place of Cog's SDK's own, for this test only."""
    from cog.types import URLPath

    monkeypatch.setattr(URLPath, "convert", URLPath.convert)  # the SDK's own again after this test


def given(value: str):
    """An input as Cog's server hands it to run(): cog.types.Path.validate, then convert (installed)."""
    from cog.types import Path as CogPath

    return CogPath.validate(value).convert()


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
        assert image.name.endswith("photo.png") and mask.name.endswith(".png") and host.served == ["/photo.png"]
        assert nothing is None and local == tmp_path / "photo.png"  # a path of the caller's own, as it is
    assert list(folder.iterdir()) == [] and local.exists()


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
