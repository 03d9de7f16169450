"""The blocking client: a _Session (session.py) that waits in epoll."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

import zmq

from .. import _protocol as proto
from .._errors import BrokerGone, BrokerNotRunning, EndOfStream
from .._paths import control_endpoint, ipc_path
from .._stats import BrokerStats
from .session import Batch, Callback, Packet, _check_socket, _Hand, _Session
from .tx import DEFAULT_FRAME_SIZE, DEFAULT_FRAMES, Tx

__all__ = ["Batch", "Client", "Packet", "broker_stats", "brokers", "connect"]


class Client(_Session):
    """One named client of one broker. See connect()."""

    def __init__(self, server: str, client: str, *, group: str | None = None,
                 balance: str | None = None, policy: str | None = None,
                 credit: int | None = None, timeout: float = proto.DEFAULT_TIMEOUT,
                 reconnect: float = proto.DEFAULT_RECONNECT,
                 filter: str | None = None) -> None:
        super().__init__(server, client, group=group, balance=balance, policy=policy,
                         credit=credit, reconnect=reconnect, filter=filter)
        try:
            deadline = time.monotonic() + timeout
            self._open()
            while not self._attached():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._gave_up(timeout)
                self._wait(left)
        except BaseException:
            self._teardown()
            raise

    def _wait(self, timeout: float | None) -> None:
        """Until fileno() is readable, or `timeout` seconds (None: for ever)."""
        self._epoll.poll(-1 if timeout is None else timeout)

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch; None if none came within `timeout` seconds (None:
        wait for ever). Raises EndOfStream after the broker's last batch.
        If the broker dies, the client attaches to the one that takes its
        place (sequence numbers start again; `epoch` changes) and raises
        BrokerGone only if none comes within `reconnect` seconds, or if the
        broker evicted this client (and again at every later call)."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (batch := self._take()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._wait(left)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        """Batches until end-of-stream."""
        while True:
            try:
                b = self.next_batch()
            except EndOfStream:
                return
            if b is not None:
                yield b

    def packets(self, timeout: float | None = None) -> Iterator[Packet]:
        """Every packet until end-of-stream, as copies; each batch is released
        before its packets are yielded. Stops early if `timeout` passes with
        no batch."""
        while True:
            try:
                b = self.next_batch(timeout)
            except EndOfStream:
                return
            if b is None:
                return
            with b:
                copies = b._copies()
            yield from copies

    # -- pcap-style --
    def dispatch(self, cnt: int, callback: Callback, *, timeout: float | None = None,
                 interpret: bool = False, packets: bool = False) -> int:
        """As pcap_dispatch(): calls `callback(data, ts, wirelen)` for each
        packet of the batch at hand, at most `cnt` of them (cnt <= 0: the
        rest of the batch), waiting at most `timeout` seconds (None: for
        ever) for a batch if none is at hand. `data` is a read-only view,
        valid until the callback returns (copy what you keep), `ts` the
        capture time in seconds (a float; Packet.ts_ns has the nanoseconds),
        `wirelen` the length on the wire. packets=True: `callback(packet)`
        with a Packet instead. interpret=True: `data` is decoded by dpkt
        (pip install 'pktipc[decode]'), or the bytes it cannot decode.

        Returns the packets handled (>0), or 0 if none came in time; raises
        EndOfStream after the last packet (libpcap returns 0 for both), and
        what the callback raises (the packet counts as handled)."""
        self._check_dispatch(interpret, packets)
        if self._hand is None:
            batch = self.next_batch(timeout)
            if batch is None:
                return 0
            self._hand = _Hand(batch)
        return self._dispatch(cnt, callback, interpret, packets)

    def loop(self, cnt: int, callback: Callback, *, interpret: bool = False,
             packets: bool = False) -> int:
        """As pcap_loop(): dispatches until `cnt` packets are handled (cnt
        <= 0: until end-of-stream) and returns how many were: `cnt`, or
        fewer only when the stream ended (libpcap returns 0 for both).
        Stop it early by raising an exception in the callback."""
        done = 0
        while cnt <= 0 or done < cnt:
            try:
                done += self.dispatch(cnt - done if cnt > 0 else -1, callback,
                                      interpret=interpret, packets=packets)
            except EndOfStream:
                break
        return done

    def next(self, timeout: float | None = None) -> Packet | None:
        """The next packet, a copy (its data is bytes); None if none came
        within `timeout` seconds (None: wait for ever). Raises EndOfStream
        after the last one (pcap_next returns NULL for both)."""
        got: list[Packet] = []
        if not self.dispatch(1, got.append, timeout=timeout, packets=True):
            return None
        return got[0]._replace(data=bytes(got[0].data))

    # -- sending --
    def tx(self, *, wait: bool = True, frames: int = DEFAULT_FRAMES,
           frame_size: int = DEFAULT_FRAME_SIZE, batch: int | None = None,
           timeout: float = proto.DEFAULT_TIMEOUT) -> Tx:
        """This client's sending side (made at the first call, the same
        afterwards): frames out of the interfaces the broker sends on
        (`pktipc serve -i IFACE --tx`), through a TX area of `frames` slots
        of `frame_size` bytes (the longest frame) that only this client
        writes. wait: a frame allocated while every slot waits for the
        broker waits for one (else Busy is raised). batch: frames sent in
        one TX message once that many wait (default: an eighth of the
        slots). Raises Refused (code "tx-refused") if this client may not
        send (serve --allow-tx)."""
        self._check_open()
        if self._tx is not None:
            self._tx.wait = wait
            return self._tx
        area = self._tx_area(frames, frame_size)
        try:
            deadline = time.monotonic() + timeout
            while True:
                self._service()             # raises Refused for a refusal
                if self._tx_ready is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._sock is None:
                    raise BrokerGone(f"broker {self.server!r} did not answer TX_OPEN")
                self._wait(left)
        except BaseException:
            area.close()
            raise
        area.unlink()
        self._tx = Tx(self, area, self._tx_ready, wait, batch or max(1, frames // 8))
        return self._tx

    def send(self, frames: Iterable[bytes], iface: int | str = 0) -> int:
        """Sends each frame out of `iface` (see tx()), in order, and
        flushes: the number of frames sent."""
        n = 0
        with self.tx() as tx:
            for frame in frames:
                buf = tx.allocate(len(frame), iface)
                buf[:] = frame
                tx.send(buf)
                n += 1
        return n

    def _poll_tx(self, timeout: float | None, until: Callable[[], bool] | None = None) -> None:
        """Takes what the broker sent (TX_DONE among it) until `until()`
        holds, or `timeout` seconds (None: no limit) pass, or the Tx broke."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._service()
            if self._tx is None or self._tx._broken is not None or (until and until()):
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self._wait(left)

    def stats(self, timeout: float = 2.0) -> BrokerStats:
        """The broker's statistics (a STATS request); raises BrokerGone if
        it does not answer within `timeout` seconds or is lost."""
        self._check_open()
        self._ask_stats()
        deadline = time.monotonic() + timeout
        while (reply := self._stats_reply()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerGone(f"broker {self.server!r} did not answer STATS")
            self._wait(left)
        return BrokerStats.from_reply(reply)

    def close(self) -> None:
        """Detaches from the broker (BYE); idempotent."""
        self._bye()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def connect(server: str, client: str, *, group: str | None = None, balance: str | None = None,
            policy: str | None = None, credit: int | None = None,
            timeout: float = proto.DEFAULT_TIMEOUT,
            reconnect: float = proto.DEFAULT_RECONNECT, filter: str | None = None,
            key: str | None = None, server_key: str | None = None,
            insecure: bool = False) -> Client:
    """Attaches to broker `server` as `client`, a name unique on that broker.
    `server` is a broker of this host (its name, or "ipc://..."), or one of
    another host, "tcp://HOST:PORT/NAME", through the gateway listening there
    (pktipc gateway): the same client, its batches holding their packets'
    bytes (no sending: tx() is refused). Over TCP, `key` is this client's key
    file (.key_secret, from pktipc keygen) and `server_key` the gateway's
    public key file (.key): CURVE encrypts and authenticates both ends;
    insecure=True instead speaks plain TCP, unauthenticated and in clear.

    group: every group receives every packet; the members of a group share
    its packets (default: a group of its own, named as the client). balance:
    how a group divides them, "flow" (the default: every packet of a flow,
    both ways, to one member) or "round-robin" (whole batches in turn); the
    group's first member sets it, and asking another is refused (Refused,
    code "balance-mismatch").

    policy: "block" (lossless: the broker waits for this client) or "drop"
    (the broker skips ahead when it lags, reporting Client.gaps); default:
    the broker's. credit: batches held at most at once. timeout: for this
    first attachment. reconnect: if the broker dies, how long to keep trying
    to attach to the one that takes its place (0: raise BrokerGone at once).
    filter: keep only the packets this expression (tcpdump's syntax) matches
    (see Client.set_filter).

    Raises ValueError for a bad name or option, FilterError for a filter
    libpcap refuses, BrokerNotRunning if no broker answers within `timeout`,
    Refused (NameTaken, ...) if the broker refuses the client,
    PermissionDenied, UntrustedBroker, LayoutError.
    """
    if server.startswith("tcp://"):
        from .remote import RemoteClient

        return RemoteClient(server, client, key=key, server_key=server_key, insecure=insecure,
                            group=group, balance=balance, policy=policy, credit=credit,
                            timeout=timeout, reconnect=reconnect, filter=filter)
    return Client(server, client, group=group, balance=balance, policy=policy, credit=credit,
                  timeout=timeout, reconnect=reconnect, filter=filter)


def broker_stats(server: str, timeout: float = 2.0) -> BrokerStats:
    """The statistics of broker `server`, without attaching to it. Raises
    BrokerNotRunning if it does not answer within `timeout` seconds."""
    endpoint = control_endpoint(server)
    _check_socket(server, ipc_path(endpoint))
    conn = proto.ClientConnection()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        conn.request_stats(time.monotonic())
        for frame in conn.frames_to_send():
            sock.send(frame)
        if not sock.poll(int(timeout * 1000)):
            raise BrokerNotRunning(f"broker {server!r} did not answer within {timeout:g} s")
        for ev in conn.receive(sock.recv(), time.monotonic()):
            if isinstance(ev, proto.StatsReceived):
                return BrokerStats.from_reply(ev.stats)
        raise BrokerNotRunning(f"{endpoint} did not answer STATS")
    except proto.RemoteProtocolError as e:
        raise BrokerNotRunning(f"{endpoint} is not a pktipc broker: {e}") from e
    finally:
        sock.close()
        ctx.term()


def brokers() -> list[str]:
    """Names of the brokers with a control socket in the runtime directory."""
    from .._paths import runtime_dir

    rdir = runtime_dir()
    if not rdir.is_dir():
        return []
    return sorted(p.name[: -len(".ctl")] for p in rdir.glob("*.ctl"))
