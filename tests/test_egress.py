"""Outbound fetches of the URLs a request names (inpaint/egress.py): only to the addresses a deployment allows,
checked on each connection (redirects, every record of a name, every spelling of an address), cut at one
deadline whatever they wait for (a connect, a name lookup, headers, a trickled or stalled body, plain or TLS),
and a failure named by its innermost cause."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import urllib.parse
from contextlib import closing

import pytest
import requests
from urllib3.connection import HTTPConnection

from conftest import make_photo
from webhost import LOOPBACK, Host

from inpaint import egress
from inpaint.config import Settings
from inpaint.urlinputs import Downloads


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
    proto, canonname, sockaddr), as a DNS server that holds those records would have it answered: for each
    address an entry of the socket type asked for, or, asked for none (0), a stream, a datagram and a raw
    one, as glibc's getaddrinfo(3) gives them."""
    real = socket.getaddrinfo
    kinds = {socket.SOCK_STREAM: 6, socket.SOCK_DGRAM: 17, socket.SOCK_RAW: 0}

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host not in answers:
            return real(host, port, family, type, proto, flags)
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, kind, protocol, "",
                 (address, port, 0, 0) if ":" in address else (address, port))
                for address in answers[host] for kind, protocol in kinds.items() if type in (0, kind)]

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
    that never resolve would leave a thread each. At most LOOKUPS_AT_ONCE are under way in a Downloads; a URL
    whose host is an address needs none, and is fetched while they are all taken."""
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
    fetched = downloads.fetch_url(f"{host.url}/photo.png", "photo.png")  # an address: no lookup, nor a place to wait for
    assert fetched.stat().st_size > 0 and resolving() - before == egress.LOOKUPS_AT_ONCE
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
