"""The asyncio client: a _Session (session.py) that waits in the event loop.

No thread and no polling: the session's descriptor (fileno()) is a reader
of the event loop, whose callback does what has come or is due (messages,
heartbeats, reconnection attempts: the protocol machine's timer is in that
descriptor) and wakes the coroutines waiting. Messages are read by the
callback without waiting, straight into the protocol machine, so no
message ever waits in a future a cancellation could drop (as pyzmq's own
zmq.asyncio may): a cancelled call loses nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import Any

from .. import _protocol as proto
from .._errors import BrokerGone, EndOfStream
from .._stats import BrokerStats
from .session import Batch, Callback, Packet, _Hand, _Session


def _wake(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)


class AsyncClient(_Session):
    """One named client of one broker, for asyncio. See pktipc.aio.connect()."""

    def __init__(self, server: str, client: str, **options: Any) -> None:
        self._loop = asyncio.get_running_loop()
        super().__init__(server, client, **options)
        self._waiters: set[asyncio.Future[None]] = set()
        self._deferred: BaseException | None = None
        self._loop.add_reader(self._epoll.fileno(), self._on_ready)

    def _on_ready(self) -> None:
        try:
            self._service()
        except Exception as e:      # for the coroutine that calls next
            self._deferred = e
        for w in self._waiters:
            _wake(w)

    async def _wait(self, timeout: float | None) -> None:
        """Until the reader has run, or `timeout` seconds (None: for ever)."""
        w = self._loop.create_future()
        self._waiters.add(w)
        timer = None if timeout is None else self._loop.call_later(timeout, _wake, w)
        try:
            await w
        finally:
            self._waiters.discard(w)
            if timer is not None:
                timer.cancel()

    def _check_call(self) -> None:
        """Raises what the reader met since the last call (a failure is
        raised by _service too, at every call)."""
        self._check_open()
        e, self._deferred = self._deferred, None
        if e is not None and e is not self._failure:
            raise e

    async def _attach(self, timeout: float) -> None:
        try:
            deadline = time.monotonic() + timeout
            self._open()
            while not self._attached():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._gave_up(timeout)
                await self._wait(left)
        except BaseException:
            self._loop.remove_reader(self._epoll.fileno())
            self._teardown()
            raise

    async def next_batch(self, timeout: float | None = None) -> Batch | None:
        """As Client.next_batch: the next batch, None if none came within
        `timeout` seconds, EndOfStream after the last one. Cancelling it
        loses no batch: the next call returns it."""
        self._check_call()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (batch := self._take()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            await self._wait(left)
            self._check_call()
        return batch

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self._batches_until_end()

    async def _batches_until_end(self) -> AsyncIterator[Batch]:
        while True:
            try:
                b = await self.next_batch()
            except EndOfStream:
                return
            if b is not None:
                yield b

    async def packets(self, timeout: float | None = None) -> AsyncIterator[Packet]:
        """As Client.packets: every packet until end-of-stream, as copies."""
        while True:
            try:
                b = await self.next_batch(timeout)
            except EndOfStream:
                return
            if b is None:
                return
            with b:
                copies = b._copies()
            for p in copies:
                yield p

    async def dispatch(self, cnt: int, callback: Callback, *, timeout: float | None = None,
                       interpret: bool = False, packets: bool = False) -> int:
        """As Client.dispatch (pcap_dispatch), waiting in the event loop."""
        self._check_dispatch(interpret, packets)
        if self._hand is None:
            batch = await self.next_batch(timeout)
            if batch is None:
                return 0
            self._hand = _Hand(batch)
        return self._dispatch(cnt, callback, interpret, packets)

    async def loop(self, cnt: int, callback: Callback, *, interpret: bool = False,
                   packets: bool = False) -> int:
        """As Client.loop (pcap_loop): `cnt` packets handled, fewer only at
        end-of-stream; cnt <= 0: until end-of-stream."""
        done = 0
        while cnt <= 0 or done < cnt:
            try:
                done += await self.dispatch(cnt - done if cnt > 0 else -1, callback,
                                            interpret=interpret, packets=packets)
            except EndOfStream:
                break
        return done

    async def next(self, timeout: float | None = None) -> Packet | None:
        """As Client.next: the next packet (a copy), None on timeout,
        EndOfStream after the last one."""
        got: list[Packet] = []
        if not await self.dispatch(1, got.append, timeout=timeout, packets=True):
            return None
        return got[0]._replace(data=bytes(got[0].data))

    async def stats(self, timeout: float = 2.0) -> BrokerStats:
        """As Client.stats: the broker's statistics."""
        self._check_call()
        self._ask_stats()
        deadline = time.monotonic() + timeout
        while (reply := self._stats_reply()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerGone(f"broker {self.server!r} did not answer STATS")
            await self._wait(left)
            self._check_call()
        return BrokerStats.from_reply(reply)

    def close(self) -> None:
        """Detaches from the broker (BYE); idempotent."""
        if not self._closed:
            self._loop.remove_reader(self._epoll.fileno())
            for w in self._waiters:
                _wake(w)        # a coroutine waiting in it gets ClosedError
        self._bye()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Connecting:
    """What connect() returns: awaited, the client; or `async with` it."""

    def __init__(self, server: str, client: str, timeout: float, options: dict[str, Any]
                 ) -> None:
        self._args = (server, client, timeout, options)
        self._client: AsyncClient | None = None

    async def _connect(self) -> AsyncClient:
        server, client, timeout, options = self._args
        c = AsyncClient(server, client, **options)
        await c._attach(timeout)
        return c

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self._connect().__await__()

    async def __aenter__(self) -> AsyncClient:
        self._client = await self._connect()
        return self._client

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._client is not None
        self._client.close()


def connect(server: str, client: str, *, group: str | None = None,
            balance: str | None = None, policy: str | None = None, credit: int | None = None,
            timeout: float = proto.DEFAULT_TIMEOUT, reconnect: float = proto.DEFAULT_RECONNECT,
            filter: str | None = None) -> _Connecting:
    """pktipc.connect for asyncio: `c = await connect(...)`, or
    `async with connect(...) as c:`. Options and errors as pktipc.connect's.

    While it is attached, the event loop keeps the client alive (heartbeats)
    and reads the broker's messages, whether or not a coroutine is waiting
    for a batch: only a loop blocked longer than the broker's liveness
    (serve --liveness, 30 s by default), or a batch held longer than its
    lease (serve --lease), has the client evicted.
    """
    options: dict[str, Any] = dict(group=group, balance=balance, policy=policy, credit=credit,
                                   reconnect=reconnect, filter=filter)
    return _Connecting(server, client, timeout, options)
