"""`pktipc top`: brokers, sources, groups and clients, live, from STATS.

Full screen (rich) on a terminal, q quits; a plain table every interval
when stdout is not a terminal. Rates are differences between two STATS
replies of the same broker run (its epoch), divided by the time between
them.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._client.client import broker_stats, brokers
from .._errors import PktipcError
from .._stats import BrokerStats

Stats = BrokerStats


def si(x: float, unit: str = "") -> str:
    """3 significant digits and an SI prefix: 1234567 -> '1.23M'."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}" if isinstance(x, float) and x % 1 else f"{int(x)}{unit}"


def _duration(s: float) -> str:
    s = int(s)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


@dataclass
class Sample:
    at: float
    stats: Stats


@dataclass
class Rates:
    """Per-second rates between the previous and the latest reply of each broker."""

    last: dict[str, Sample] = field(default_factory=dict)
    prev: dict[str, Sample] = field(default_factory=dict)

    def update(self, name: str, stats: Stats, at: float) -> None:
        old = self.last.get(name)
        if old is not None and old.stats.epoch == stats.epoch:
            self.prev[name] = old
        else:
            self.prev.pop(name, None)       # a new broker run: counters started again
        self.last[name] = Sample(at, stats)

    def per_s(self, name: str, path: Sequence[Any]) -> float | None:
        """d(value at `path`)/dt; None before two replies of one run. A path
        step that is a str reads an attribute; ("name", x) finds the entry
        named x."""
        a, b = self.prev.get(name), self.last.get(name)
        if a is None or b is None or b.at <= a.at:
            return None
        va, vb = _get(a.stats, path), _get(b.stats, path)
        if va is None or vb is None:
            return None
        return max(0.0, (vb - va) / (b.at - a.at))


def _get(d: Any, path: Sequence[Any]) -> float | None:
    for step in path:
        if isinstance(step, tuple):
            d = next((x for x in d if x.name == step[1]), None)
        else:
            d = getattr(d, step, None)
        if d is None:
            return None
    return float(d)


def _rate(r: float | None, unit: str = "") -> str:
    return "-" if r is None else si(r, unit)


def slowest(stats: Stats) -> str | None:
    """The attached client furthest behind: most packets owed and not given
    back, then most drops. None when nobody is behind."""
    behind = [c for c in stats.clients if c.attached and (c.lag_packets or c.queued)]
    if not behind:
        return None
    return max(behind, key=lambda c: (c.lag_packets, c.queued, c.drops)).name


def broker_view(name: str, stats: Stats | None, error: str | None,
                rates: Rates) -> RenderableType:
    if stats is None:
        return Text(f"{name}: {error}", style="bold red")
    s, c = stats, stats.counters
    slabs = s.slabs
    used = slabs.count - slabs.free
    kernel = sum(src.kernel_drops or 0 for src in s.sources)
    kernel_rate = sum(rates.per_s(name, ("sources", ("name", src.name), "kernel_drops"))
                      or 0.0 for src in s.sources if src.kernel_drops is not None)
    head = Text.assemble(
        (name, "bold"), f"  {s.state}  up {_duration(s.uptime_s)}  pid {s.pid}  ring ",
        (f"{used}/{slabs.count}", "bold red" if used == slabs.count else "bold"),
        f" slabs ({100 * used // max(1, slabs.count)}%)  errors {si(c.protocol_errors)}"
        f"  evicted {si(c.evictions)}")
    drops = Text.assemble(
        "  drops  kernel ", (si(kernel), "red" if kernel else ""),
        f" ({_rate(kernel_rate if name in rates.prev else None)}/s)  broker ",
        (si(c.broker_drops), "red" if c.broker_drops else ""),
        f" ({_rate(rates.per_s(name, ('counters', 'broker_drops')))}/s)  clients ",
        (si(c.client_drops), "red" if c.client_drops else ""),
        f" ({_rate(rates.per_s(name, ('counters', 'client_drops')))}/s)")

    src = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for col, just in (("source", "left"), ("pkts/s", "right"), ("bit/s", "right"),
                      ("packets", "right"), ("k.drops", "right"), ("freezes", "right")):
        src.add_column(col, justify=just, no_wrap=True, overflow="ellipsis",  # type: ignore[arg-type]
                       max_width=20 if col == "source" else None)
    for so in s.sources:
        at = ("sources", ("name", so.name))
        bps = rates.per_s(name, (*at, "bytes"))
        src.add_row(so.name, _rate(rates.per_s(name, (*at, "packets"))),
                    _rate(None if bps is None else 8 * bps), si(so.packets),
                    "-" if so.kernel_drops is None else si(so.kernel_drops),
                    "-" if so.kernel_freezes is None else si(so.kernel_freezes))

    cl = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for col, just in (("", "left"), ("client", "left"), ("group", "left"),
                      ("policy", "left"), ("pkts/s", "right"), ("drops", "right"),
                      ("drops/s", "right"), ("held", "right"), ("lag", "right")):
        cl.add_column(col, justify=just, no_wrap=True, overflow="ellipsis",  # type: ignore[arg-type]
                      max_width=16 if col in ("client", "group") else None)
    worst = slowest(s)
    members = {g.name: g for g in s.groups}
    for x in sorted(s.clients, key=lambda x: (x.group, x.slot)):
        at = ("clients", ("name", x.name))
        g = members.get(x.group)
        group = x.group if g is None or len(g.members) < 2 else f"{x.group}/{g.balance[0]}"
        cl.add_row(">" if x.name == worst else "",
                   x.name + ("" if x.attached else " (away)"), group, x.policy,
                   _rate(rates.per_s(name, (*at, "packets"))), si(x.drops),
                   _rate(rates.per_s(name, (*at, "drops"))), f"{x.held}/{x.credit}",
                   si(x.lag_packets),
                   style="bold red" if x.name == worst else "red" if x.drops else None)
    parts: list[RenderableType] = [head, drops, src]
    parts.append(cl if s.clients else Text("  no client attached", style="dim"))
    return Group(*parts)


def poll(names: Sequence[str], rates: Rates, timeout: float = 1.0
         ) -> list[tuple[str, Stats | None, str | None]]:
    out: list[tuple[str, Stats | None, str | None]] = []
    for name in names or brokers():
        try:
            st = broker_stats(name, timeout=timeout)
        except PktipcError as e:
            out.append((name, None, str(e)))
            continue
        rates.update(name, st, time.monotonic())
        out.append((name, st, None))
    return out


def screen(names: Sequence[str], rates: Rates) -> RenderableType:
    views = [broker_view(n, s, e, rates) for n, s, e in poll(names, rates)]
    if not views:
        return Text("no broker is running", style="dim")
    footer = Text("> slowest client   lag: packets owed to it, not given back   q: quit",
                  style="dim")
    return Group(*views, footer)


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive unbuffered, unechoed), if a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _wait_for_q(fd: int | None, timeout: float) -> bool:
    """Waits up to `timeout` s; True if q was pressed."""
    if fd is None:
        time.sleep(timeout)
        return False
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0] and b"q" in os.read(fd, 64).lower():
            return True
    return False


def run(names: Sequence[str], interval: float = 1.0, count: int | None = None,
        out: TextIO = sys.stdout) -> int:
    """Live view on a terminal; otherwise a plain table every `interval`.
    `count`: stop after that many refreshes."""
    if interval <= 0:
        raise ValueError("-d must be a positive number of seconds")
    rates = Rates()
    n = 0
    if out.isatty():
        console = Console(file=out)
        with _keys() as fd, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                live.update(screen(names, rates), refresh=True)
                n += 1
                if (count is not None and n >= count) or _wait_for_q(fd, interval):
                    return 0
    console = Console(file=out, width=int(os.environ.get("COLUMNS", 100)),
                      no_color=True, highlight=False)
    while True:
        console.print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}")
        console.print(screen(names, rates))
        out.flush()
        n += 1
        if count is not None and n >= count:
            return 0
        time.sleep(interval)
