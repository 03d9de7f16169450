"""A client of a broker on another host: through the gateway beside it, over
ZeroMQ TCP, CURVE-encrypted and authenticated unless told otherwise; the
packets come in the messages (one per batch), not from a segment."""

from __future__ import annotations

import re
import select
import time
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from .. import _protocol as proto
from .._errors import (
    BrokerNotRunning,
    LayoutError,
    PermissionDenied,
    PktipcError,
    UntrustedBroker,
)
from .._layout import IFACE_SIZE, LAYOUT_VERSION, MAX_IFACES, Iface
from .._paths import check_name
from .._shm import ffi
from .aio import AsyncClient
from .client import Client
from .session import SEND_TIMEOUT_MS, Batch, _Carried, _CarriedBatch, _Filter

# tcp://HOST:PORT/NAME, HOST a name, an IPv4 address or [an IPv6 one]
_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/([^/]*)")
_HANDSHAKE = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_CONNECT_RETRIED)
MAX_MESSAGE = 1 << 31       # a batch's bytes: a slab (at most 1 GiB), and its descriptors


def parse_url(url: str) -> tuple[str, str]:
    """(ZeroMQ endpoint, broker name) of tcp://HOST:PORT/NAME."""
    m = _URL.fullmatch(url)
    if m is None or not 0 < int(m[2]) < 65536:
        raise ValueError(f"{url}: a remote broker is tcp://HOST:PORT/NAME (HOST a name or "
                         "address, [an IPv6 one] in brackets, PORT 1-65535, NAME the broker's)")
    check_name("broker", m[3])
    return f"tcp://{m[1]}:{m[2]}", m[3]


class Keys:
    """CURVE keys of a client: its own key pair, and the gateway's public key."""

    def __init__(self, key: str, server_key: str) -> None:
        self.public, self.secret = _load(key, "key")
        if self.secret is None:
            raise ValueError(f"{key}: holds no secret key (give the .key_secret file "
                             "pktipc keygen wrote)")
        self.server, _ = _load(server_key, "server key")
        self.path = key


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: cannot read it ({e})") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise ValueError(f"{what} {path}: not a CURVE key file (pktipc keygen writes them)")
    return public, secret


def secure(sock: zmq.Socket[Any], keys: Keys | None) -> None:
    """Makes `sock` a CURVE client of the gateway (nothing with no keys)."""
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.server


def parse_ifaces(table: bytes) -> list[Iface]:
    """The interface table REMOTE_WELCOME carries, as the segment holds it."""
    n, rest = divmod(len(table), IFACE_SIZE)
    if rest or n > MAX_IFACES:
        raise LayoutError(f"an interface table of {len(table)} bytes")
    entries = ffi.from_buffer("struct pktipc_iface[]", table)
    return [Iface(name=ffi.string(e.name).decode(errors="replace"), linktype=int(e.linktype),
                  snaplen=int(e.snaplen), kind=int(e.kind), ifindex=int(e.ifindex),
                  ts_resolution=int(e.ts_resolution)) for e in entries[0:n]]


class _Remote:
    """What makes a client's session (session.py) one of broker NAME behind
    the gateway at tcp://HOST:PORT/NAME, for either edge: the CURVE socket
    and its handshake, REMOTE_WELCOME's interface table in place of a
    segment, batches built from the REMOTE_BATCH message (_CarriedBatch).
    Sending (tx()) is not offered over TCP."""

    # Set by _Session; declared for the type checker.
    _sock: zmq.Socket[bytes] | None
    _sock_fd: int
    _epoll: Any
    _ctx: zmq.Context[Any]
    _conn: proto.ClientConnection
    _map: Any
    _filter: str | None
    _owner: int | None
    name: str

    def __init__(self, url: str, client: str, *, key: str | None = None,
                 server_key: str | None = None, insecure: bool = False,
                 **kw: Any) -> None:
        self.url = url
        self._endpoint, self._broker = parse_url(url)
        if insecure:
            self._keys: Keys | None = None
        elif key is None or server_key is None:
            raise ValueError(f"{url}: CURVE needs this client's key (the .key_secret file of "
                             "pktipc keygen) and the gateway's public key (its .key file); "
                             "insecure=True (--insecure) for plain TCP, unauthenticated and "
                             "in clear")
        else:
            self._keys = Keys(key, server_key)
        self._monitor: zmq.Socket[bytes] | None = None
        self._monitor_fd = -1
        super().__init__(url, client, **kw)     # type: ignore[call-arg]

    def _connection(self, reconnect: float) -> proto.ClientConnection:
        return proto.ClientConnection(reconnect, server=self._broker)

    def _open(self) -> None:
        self._owner = None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        secure(sock, self._keys)
        if self._conn.state is proto.State.NEW:
            # The first attachment says why it fails: a key refused, a
            # handshake that fails, nobody listening.
            self._monitor = sock.get_monitor_socket(_HANDSHAKE)
            self._monitor_fd = self._monitor.fileno()
            self._epoll.register(self._monitor_fd, select.EPOLLIN)
        sock.connect(self._endpoint)
        self._sock, self._sock_fd = sock, sock.fileno()
        self._epoll.register(self._sock_fd, select.EPOLLIN)
        self._conn.hello(time.monotonic(), name=self.name, group=self._group,  # type: ignore[attr-defined]
                         policy=self._policy, credit=self._credit,  # type: ignore[attr-defined]
                         balance=self._balance)  # type: ignore[attr-defined]
        self._flush()  # type: ignore[attr-defined]

    def _end_monitor(self) -> None:
        if self._monitor is not None:
            self._epoll.unregister(self._monitor_fd)
            if self._sock is not None:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor, self._monitor_fd = None, -1

    def _drop_socket(self, linger: int = 100) -> None:
        self._end_monitor()
        super()._drop_socket(linger)  # type: ignore[misc]

    def _teardown(self) -> None:
        epoll = getattr(self, "_epoll", None)
        if epoll is not None and not epoll.closed:
            self._end_monitor()
        super()._teardown()  # type: ignore[misc]

    def _service(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            self._handshake(dict(parse_monitor_message(self._monitor.recv_multipart())))
        super()._service()  # type: ignore[misc]

    def _handshake(self, ev: dict[str, Any]) -> None:
        """Raises what a failed connection or handshake means."""
        event, where = ev["event"], self._endpoint
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        self._drop_socket(linger=0)
        if event == zmq.EVENT_CONNECT_RETRIED:
            raise BrokerNotRunning(f"no gateway answers at {where} (connection refused, or "
                                   "the host is unreachable)")
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            assert self._keys is not None
            raise PermissionDenied(
                f"the gateway at {where} does not admit this client's key "
                f"({self._keys.path}: its public key {self._keys.public.decode()} must be in "
                "the gateway's --keys directory)")
        if self._keys is None:
            raise PermissionDenied(f"the gateway at {where} wants CURVE: give this client's "
                                   "key and the gateway's public key, not insecure")
        raise UntrustedBroker(f"the CURVE handshake with {where} failed: the server there does "
                              "not hold the key given as the gateway's (a wrong server key, "
                              "another host answering), or it runs --insecure")

    def _recv(self, flags: int = 0) -> tuple[bytes, tuple[Any, ...]]:
        assert self._sock is not None
        first, *more = self._sock.recv_multipart(flags, copy=False)
        return first.bytes, tuple(more)

    def _use(self, w: proto.Welcomed) -> None:
        self._end_monitor()
        if w.layout != LAYOUT_VERSION:
            raise LayoutError(f"broker uses layout {w.layout}, this client reads "
                              f"{LAYOUT_VERSION}")
        carried = _Carried(w.epoch, parse_ifaces(w.ifaces))
        if self._filter is not None:
            carried.filter = _Filter(self._filter, carried.ifaces)
        self._epoch_seen(w.epoch)  # type: ignore[attr-defined]
        # A new one at each attachment: batches of an earlier one are not
        # released to this one.
        self._map = carried
        self.welcome = w
        self._ended = False
        self._conn.mapped(time.monotonic())
        self._flush()  # type: ignore[attr-defined]

    def _batch(self, b: proto.BatchAnnounced | proto.BatchReceived) -> Batch:
        assert isinstance(b, proto.BatchReceived) and isinstance(self._map, _Carried)
        return _CarriedBatch(self, self._map, b)  # type: ignore[arg-type]

    def _tx_area(self, frames: int, frame_size: int) -> Any:
        raise PktipcError(f"{self.url}: sending (tx()) goes through a broker of this host only, "
                          "not through a gateway over tcp://")


class RemoteClient(_Remote, Client):
    """A client of broker NAME behind the gateway at tcp://HOST:PORT/NAME:
    the same API as a local one; batches hold their packets' bytes."""


class AsyncRemoteClient(_Remote, AsyncClient):
    """pktipc.aio's client of a broker behind a gateway (tcp://)."""


def remote_stats(url: str, *, key: str | None = None, server_key: str | None = None,
                 insecure: bool = False, timeout: float = 2.0) -> dict[str, Any]:
    """The STATS reply of the broker behind a gateway, with the gateway's
    counters (under "gateway"), without attaching."""
    endpoint, broker = parse_url(url)
    keys = None if insecure else Keys(key or "", server_key or "") if key and server_key \
        else None
    if keys is None and not insecure:
        raise ValueError(f"{url}: CURVE needs a key and the gateway's public key, or insecure")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure(sock, keys)
    try:
        sock.connect(endpoint)
        conn = proto.ClientConnection(server=broker)
        conn.request_stats(time.monotonic())
        for frame in conn.frames_to_send():
            sock.send(frame)
        if not sock.poll(int(timeout * 1000)):
            raise BrokerNotRunning(f"no gateway answered at {endpoint} within {timeout:g} s")
        for ev in conn.receive(sock.recv(), time.monotonic()):
            if isinstance(ev, proto.StatsReceived):
                return ev.stats
            if isinstance(ev, proto.RequestRefused):
                raise BrokerNotRunning(f"{url}: {ev.text}")
        raise BrokerNotRunning(f"{endpoint} did not answer STATS")
    except proto.RemoteProtocolError as e:
        raise BrokerNotRunning(f"{endpoint} is not a pktipc gateway: {e}") from e
    finally:
        sock.close()
        ctx.term()
