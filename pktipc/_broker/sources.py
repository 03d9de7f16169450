"""What every packet source gives the broker's loop: one contract, so that
capture files and interfaces (and any source to come) are served by one
path of the loop, with no branch on the kind of source."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._layout import Iface, Segment


class Status(enum.Enum):
    FULL = "full"      # the slab is full: publish it, and call again at once
    MORE = "more"      # nothing to publish yet, but call again at once
    HOLD = "hold"      # nothing to publish yet: call again at `wake`, not before
    IDLE = "idle"      # publish what the slab holds; wait for `fds` or `wake`
    END = "end"        # publish what the slab holds: no packet will follow


@dataclass
class Produced:
    status: Status
    # (interface, packets, captured bytes) added to the slab, per interface
    added: list[tuple[int, int, int]] = field(default_factory=list)
    error: str | None = None        # END: why the stream ended early, if it did
    wake: float | None = None       # IDLE: when the next packet is due (paced files); HOLD


class Source(Protocol):
    ifaces: list[Iface]
    default_policy: str             # for clients that ask for none
    default_wait_clients: int       # clients to wait for before reading
    pauses_without_clients: bool    # nothing is read while no client is attached
    frame_size: int                 # the segment's frame area, where the kernel places
    frame_count: int                # frames (AF_XDP's UMEM); 0 for none

    @property
    def short(self) -> bool:
        """It lacks what published slabs hold (frames): the broker takes back
        what only drop clients are owed."""

    def bind(self, seg: Segment) -> None:
        """The segment exists: a source that receives into it starts now."""

    @property
    def fds(self) -> list[Any]:
        """Readable when packets wait (none for files): descriptors, or ZeroMQ
        sockets (the relay's), read again at each turn of the loop."""

    def produce(self, fill: Any, now: float) -> Produced:
        """Adds packets to `fill`'s slab (struct pkb_fill), in C."""

    def recycle(self, slab: int) -> None:
        """A published slab is free again: what its descriptors name in the
        frame area is the source's again."""

    def read_counters(self, entries: list[Any]) -> None:
        """Brings the interface table entries' kernel counters up to date."""

    def error(self, i: int) -> str:
        """Why source i's fd reported an error."""

    def stats(self, i: int, entry: Any) -> dict[str, Any]:
        """What `pktipc status` shows of source i beyond packets and bytes."""

    def describe(self) -> str:
        """What is served, for the broker's first line."""

    def close(self) -> None: ...
