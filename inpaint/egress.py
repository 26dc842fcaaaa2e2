"""Outbound HTTP for a URL a request names: only to the addresses this deployment allows, all cut at one deadline.

An image or mask given as a URL makes the server fetch it, from inside the deployment's network. Left
open, a request could name the cloud's metadata service (169.254.169.254), the pod's own loopback, or a
service of the cluster's, and the server would fetch it for them (server-side request forgery). So the
address each connection goes to must be public, or in one of the networks the deployment lists
(INPAINT_URL_ALLOW_NETWORKS). It is checked where the connection is made, on the address it is made to:
a redirect is a new connection, checked again, and a name is resolved once, so a second answer of the
DNS cannot swap in another address (DNS rebinding). Through an HTTP proxy (HTTPS_PROXY, HTTP_PROXY)
the connection goes to the proxy, and the proxy's rules apply instead.

requests bounds each read of a socket, not a fetch: a host that sends a header byte every few
seconds held the fetch for as long as it liked. Each connection is therefore shut down at the deadline,
whatever it waits for. A name lookup cannot be interrupted (getaddrinfo blocks for the resolver's own
timeouts, resolv.conf(5)), so it runs in a thread of its own that the fetch stops waiting for at the
deadline or a cut, and that ends when the resolver gives up. Since a cut fetch leaves its lookup behind,
a client that sent and cancelled requests for names that never resolve could leave a thread each: the
lookups under way at once are bounded (`Guard`'s `lookups`), and a fetch waits for a free one within
its deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: an IPv4 address in the last 32 bits, reached through a translator
LOOKUPS_AT_ONCE = 16  # name lookups under way in a process at once (a thread each), where a Downloads bounds them
LOOKUP_WAIT_SECONDS = 0.05  # how often a fetch waiting for a free lookup looks whether it was cut
READ_TIMEOUT_SECONDS = 10.0  # each connect and read, as Cog's SDK has them (cog.types.URLFile)
# Blocks of IANA's special-purpose registries that are not globally reachable, which Python's own table
# (ipaddress' is_global) lacks before 3.12.4: so that every 3.12 judges them alike.
NOT_GLOBAL = tuple(ipaddress.ip_network(block) for block in (
    "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
    "64:ff9b:1::/48",  # local-use IPv4/IPv6 translation (RFC 8215): it reaches the local network's IPv4
    "3fff::/20",  # documentation (RFC 9637)
    "5f00::/16",  # segment routing SIDs (RFC 9602)
))


class FetchError(Exception):
    """A URL that could not be fetched; the message says why, without the URL."""


class Late(FetchError):
    """The deadline passed first, or the fetch was cut (Guard.cut); the caller says which it was."""


class Status(FetchError):
    """The host answered with an HTTP error (the message: its code and reason)."""


class RefusedAddress(FetchError):
    """A connection to an address the deployment does not allow; nothing was sent to it."""

    def __init__(self, host: str, refused: Sequence[Address]) -> None:
        self.host, self.refused = host, list(refused)
        if self.refused == [_literal(host)]:
            where = f"{host} is a {kind(self.refused[0])} address"
        else:
            where = f"{host} resolves to " + ", ".join(f"{address} ({kind(address)})" for address in self.refused)
        super().__init__(f"{where}, and this deployment fetches from public addresses only (and the networks "
                         "INPAINT_URL_ALLOW_NETWORKS lists)")


def _at(host: str, address: Address) -> str:
    return str(address) if _literal(host) == address else f"{host} at {address}"


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:  # a name
        return None


def kind(address: Address) -> str:
    """What a non-public address is, in the words of the IANA registries."""
    address = _embedded(address) or address
    for name in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    return "shared" if address in ipaddress.ip_network("100.64.0.0/10") else "not public"


def allowed(address: Address, networks: Sequence[Network]) -> bool:
    """Public (global in IANA's special-purpose registries, and not multicast), or in one of the networks.
    An IPv4 address inside an IPv6 one (mapped, or NAT64's) is judged as that IPv4 address."""
    inner = _embedded(address)
    if inner is not None:
        return allowed(inner, networks) or any(address in network for network in networks)
    public = address.is_global and not address.is_multicast and not any(address in block for block in NOT_GLOBAL)
    return public or any(address in network for network in networks)


def _embedded(address: Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class Guard:
    """One fetch's connections: each made to an allowed address (unless it goes to a proxy), and every one
    shut down at the deadline, or when `cut` is called (the prediction was cancelled, or its other input
    failed). `lookups`, shared by the guards of a process, bounds the name lookups under way at once.
    Use it as a context manager around the fetch."""

    def __init__(self, deadline: float, networks: Sequence[Network],
                 lookups: threading.Semaphore | None = None) -> None:
        self.deadline, self.networks = deadline, tuple(networks)
        self.lookups = lookups or threading.Semaphore(1)  # a guard's own: its connections look up one at a time
        self.expired = False
        self._sockets: list[socket.socket] = []  # duplicates of the connections' sockets: shut down, they end both
        self._lookups: list[threading.Event] = []  # name lookups waited for: set, they stop the wait
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self.cut)
        self._timer.daemon = True

    def __enter__(self) -> Guard:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for duplicate in self._sockets:
                duplicate.close()
            self._sockets.clear()

    def cut(self) -> None:
        """Shut every connection now, and refuse new ones: the fetch ends with Late."""
        with self._lock:
            self.expired = True
            for duplicate in self._sockets:
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)  # wakes a read blocked on it, TLS or not, with an end of file
                except OSError:  # not connected yet, or closed
                    pass
            for waited in self._lookups:
                waited.set()

    def connect(self, conn: HTTPConnection) -> socket.socket:
        """urllib3's HTTPConnection._new_conn: the host's name resolved once, and a connection made to the
        first of its addresses allowed (any, to a proxy) that answers, within the deadline."""
        host = conn.host
        found = self._resolve(host, conn.port)
        addresses = [(entry, ipaddress.ip_address(entry[4][0])) for entry in found]
        usable = [(entry, address) for entry, address in addresses
                  if conn.proxy is not None or allowed(address, self.networks)]
        if not usable:
            raise RefusedAddress(host, [address for _, address in addresses])
        for (family, kind_, proto, _, sockaddr), address in usable:
            try:
                return self._connect(socket.socket(family, kind_, proto), sockaddr, conn)
            except OSError as error:
                if self.expired or time.monotonic() >= self.deadline:  # a cut resets a connect under way
                    raise Late() from None
                failure = FetchError(f"no answer from {_at(host, address)}" if isinstance(error, TimeoutError) else
                                     f"could not connect to {_at(host, address)}: {error.strerror or error}")
        raise failure

    def _resolve(self, host: str, port: int) -> list[tuple]:
        """getaddrinfo's answer for `host`, waited for until the deadline or a cut (then Late). The lookup
        runs in a daemon thread, left to end when the resolver gives up, since nothing can interrupt it. An
        address needs no lookup, nor a thread: it is read as it is (AI_NUMERICHOST)."""
        if _literal(host) is not None:
            if self.expired:
                raise Late()
            return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        answer: list = []
        done = threading.Event()

        def lookup() -> None:
            try:
                answer.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
            except OSError as error:  # socket.gaierror, or the rare OSError of EAI_SYSTEM
                answer.append(error)
            finally:
                self.lookups.release()
                done.set()

        with self._lock:
            self._lookups.append(done)  # from here a cut ends the wait
            if self.expired:
                done.set()
        try:
            if not done.is_set():
                self._start(lookup)
                done.wait(max(0.0, self.deadline - time.monotonic()))
        finally:
            with self._lock:
                self._lookups.remove(done)
        if self.expired or not answer:
            raise Late()
        if isinstance(answer[0], socket.gaierror) and answer[0].errno == socket.EAI_AGAIN:
            raise FetchError("the DNS did not answer for its host name")
        if isinstance(answer[0], OSError):
            raise FetchError("its host name was not found")
        return answer[0]

    def _start(self, lookup: Callable[[], None]) -> None:
        """Start `lookup` in a thread once one of `lookups` is free (the lookup frees it as it ends)."""
        while not self.lookups.acquire(timeout=LOOKUP_WAIT_SECONDS):  # all taken: one frees as its resolver answers
            if self.expired or time.monotonic() >= self.deadline:
                raise Late()
        try:
            threading.Thread(target=lookup, name="inpaint-resolve", daemon=True).start()
        except BaseException:
            self.lookups.release()
            raise

    def _connect(self, sock: socket.socket, sockaddr: tuple, conn: HTTPConnection) -> socket.socket:
        try:
            self._hold(sock)
            for option in conn.socket_options or ():  # urllib3's TCP_NODELAY
                sock.setsockopt(*option)
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(min(conn.timeout, remaining) if isinstance(conn.timeout, (int, float)) else remaining)
            sock.connect(sockaddr)
            if self.expired:  # cut just as it connected
                raise TimeoutError
            return sock
        except BaseException:
            sock.close()
            raise

    def failure(self, error: BaseException) -> FetchError:
        """The FetchError for an error of requests or urllib3: Late once the deadline has passed, else the
        innermost cause in a few words."""
        if self.expired:
            return Late()
        while error.__cause__ is not None or error.__context__ is not None:
            error = error.__cause__ or error.__context__
        if isinstance(error, FetchError):
            return error
        if isinstance(error, (TimeoutError, urllib3.exceptions.TimeoutError)):  # a read or connect, short of the deadline
            return FetchError("its host stopped answering")
        return FetchError(f"{type(error).__name__}: {error}".removesuffix(": "))

    def _hold(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                raise TimeoutError
            self._sockets.append(sock.dup())

    def session(self) -> requests.Session:
        """A requests session (proxies and CA bundles from the environment, as requests.get has them) whose
        every connection is this guard's."""
        session = requests.Session()
        adapter = _Adapter(self)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


class _Adapter(HTTPAdapter):
    """requests' adapter with the guard's connections, direct or through an HTTP(S) proxy. (A SOCKS proxy
    needs PySocks, which the image does not hold: requests refuses it.)"""

    def __init__(self, guard: Guard) -> None:
        self.pools = _pool_classes(guard)
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.pools

    def proxy_manager_for(self, proxy: str, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = self.pools
        return manager


def _pool_classes(guard: Guard) -> dict[str, type]:
    """urllib3's pools, each with a connection class whose sockets the guard makes (classes per guard: a
    pool makes its connections from its class and keyword arguments alone)."""

    class Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class TLSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConnection

    return {"http": Pool, "https": TLSPool}


@contextmanager
def get(url: str, guard: Guard, headers: dict | None = None, timeout: float = READ_TIMEOUT_SECONDS) -> Iterator[Body]:
    """GET `url` as Cog's SDK does (requests, streamed, a compressed transfer decoded), every connection
    through `guard`: the body to read, or a FetchError. `timeout` bounds each connect and read (short of
    the guard's deadline, a host that stops answering is named so). Everything is closed when the block ends."""
    with guard.session() as session:
        try:
            response = session.get(url, stream=True, timeout=min(timeout, max(guard.deadline - time.monotonic(), 0.001)),
                                   headers=headers)
        except _TRANSPORT as error:
            raise guard.failure(error) from None
        with response:
            if response.status_code >= 400:
                raise Status(f"{response.status_code} {response.reason}")
            response.raw.decode_content = True
            yield Body(response.raw, guard)


class Body:
    """A response's content, read as it arrives (read1); an error, or an end cut short by the deadline,
    raised as a FetchError."""

    def __init__(self, raw, guard: Guard) -> None:
        self.raw, self.guard = raw, guard

    def read1(self, size: int) -> bytes:
        try:
            chunk = self.raw.read1(size)
        except _TRANSPORT as error:
            raise self.guard.failure(error) from None
        if not chunk and self.guard.expired:  # the guard shut the socket: an end of file, but not of the file
            raise Late()
        return chunk


# What requests and urllib3 raise for a failed connection, TLS handshake, read or redirect.
_TRANSPORT = (requests.RequestException, HTTPError, OSError)
