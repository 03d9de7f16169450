"""`pktipc demo`: a broker fanning packets out to several clients at once, a
live status line, and a summary table at the end.

Live by default: a veth pair in a network namespace of the demo's own,
synthetic traffic sent into one end, the broker capturing on the other.
Without the privileges for that, or given -r, it serves a capture file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .._client.client import broker_stats, connect
from .._errors import PktipcError
from .._paths import control_endpoint, ipc_path
from .netns import Namespace

CLIENT_NAMES = ("ids", "recorder", "flows", "metrics")
TAP, PEER = "pktipc0", "pktipc1"


def default_capture() -> str:
    return str(resources.files("pktipc") / "data" / "demo.pcap")


@dataclass
class Tally:
    name: str
    packets: int = 0
    bytes: int = 0
    batches: int = 0
    seconds: float = 0.0
    error: str | None = None
    seqs_in_order: bool = True
    attached: bool = False
    _next_seq: int = field(default=0, repr=False)


def _consume(broker: str, t: Tally) -> None:
    start = time.monotonic()
    try:
        with connect(broker, t.name, timeout=10) as client:
            t.attached = True
            for batch in client:
                with batch:
                    d = batch.descriptors
                    t.seqs_in_order &= batch.seq == t._next_seq
                    t._next_seq = batch.seq + len(batch)
                    t.packets += len(batch)
                    t.bytes += int(d["caplen"].sum())
                    t.batches += 1
    except PktipcError as e:
        t.error = str(e)
    t.seconds = time.monotonic() - start


def _live_unavailable() -> str | None:
    """Why a live demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "a live capture needs root (a network namespace, a veth pair, CAP_NET_RAW)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


def run(capture: str | None, clients: int, speed: float, packets: int, rate: float) -> int:
    if not 1 <= clients <= len(CLIENT_NAMES):
        raise ValueError(f"--clients must be between 1 and {len(CLIENT_NAMES)}")
    if packets < 1 or not 1 <= rate <= 1e6:
        raise ValueError("--packets must be positive and --rate between 1 and 1e6")
    if capture is None:
        why = _live_unavailable()
        if why is None:
            try:
                return _run_live(clients, packets, rate)
            except PktipcError as e:
                why = f"the live demo could not start ({e})"
        print(f"pktipc demo: {why}: serving the bundled capture instead", flush=True)
    return _run_file(capture or default_capture(), clients, speed)


def _run_file(path: str, clients: int, speed: float) -> int:
    if not Path(path).is_file():
        raise PktipcError(f"{path}: no such capture file")
    name = f"demo-{os.getpid()}"
    cmd = [sys.executable, "-m", "pktipc", "serve", "--name", name, "-r", path,
           "--speed", str(speed), "--wait-clients", str(clients)]
    print(f"pktipc demo: broker {name!r} serves {path} at {speed:g}x real time "
          f"to {clients} clients", flush=True)
    broker = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        tallies, threads = _start_clients(name, broker, clients)
        _watch(name, tallies, threads)
        status = broker.wait(timeout=30)
    finally:
        _stop(broker)
    same = len({t.packets for t in tallies}) == 1
    ok = _summary(tallies, "every client received every packet", same)
    return 0 if ok and status == 0 else 1


def _run_live(clients: int, packets: int, rate: float) -> int:
    name = f"demo-{os.getpid()}"
    ns = Namespace(f"pktipc-demo-{os.getpid()}")
    broker = gen = None
    try:
        ns.veth(TAP, PEER)
        cmd = [sys.executable, "-m", "pktipc", "serve", "--name", name, "-i", TAP,
               "--block-timeout", "5"]
        print(f"pktipc demo: broker {name!r} captures on {TAP}, a veth in namespace "
              f"{ns.name}; {packets} synthetic frames at {rate:g}/s go into its peer, "
              f"fanned out to {clients} clients", flush=True)
        broker = subprocess.Popen(ns.cmd(*cmd), stderr=subprocess.PIPE, text=True)
        tallies, threads = _start_clients(name, broker, clients)
        deadline = time.monotonic() + 10
        while not all(t.attached or t.error for t in tallies):
            if time.monotonic() > deadline:
                raise PktipcError("the clients did not attach")
            time.sleep(0.02)
        gen = subprocess.Popen(ns.cmd(sys.executable, "-m", "pktipc._tools.traffic", "-i", PEER,
                                      "-c", str(packets), "--rate", str(rate)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def sent_all() -> bool:
            if gen.poll() is None:
                return False
            deadline = time.monotonic() + 2       # what is still in the kernel's ring
            while time.monotonic() < deadline and any(t.packets < packets for t in tallies):
                time.sleep(0.05)
            broker.terminate()                    # the clients are told end-of-stream
            return True

        _watch(name, tallies, threads, stop=sent_all)
        out, err = gen.communicate()
        if gen.returncode != 0:
            raise PktipcError(f"the traffic generator failed: {err.strip()}")
        sent = int(out)
        status = broker.wait(timeout=15)
    finally:
        for p in (gen, broker):
            if p is not None:
                _stop(p)
        ns.delete()
    print(f"\nthe generator sent {sent} frames")
    ok = _summary(tallies, "every client received every frame sent",
                  all(t.packets == sent for t in tallies))
    return 0 if ok and status == 0 else 1


def _start_clients(name: str, broker: subprocess.Popen[str],
                   clients: int) -> tuple[list[Tally], list[threading.Thread]]:
    sock = ipc_path(control_endpoint(name))
    deadline = time.monotonic() + 15
    while sock is not None and not sock.exists():
        if broker.poll() is not None or time.monotonic() > deadline:
            err = (broker.stderr.read() if broker.stderr else "").strip()
            raise PktipcError(f"the broker did not start: {err.splitlines()[-1:] or '?'}")
        time.sleep(0.05)
    tallies = [Tally(n) for n in CLIENT_NAMES[:clients]]
    threads = [threading.Thread(target=_consume, args=(name, t), daemon=True)
               for t in tallies]
    for th in threads:
        th.start()
    return tallies, threads


def _watch(name: str, tallies: list[Tally], threads: list[threading.Thread],
           stop: Callable[[], bool] | None = None) -> None:
    """Prints a status line until every client is done."""
    tty = sys.stdout.isatty()
    last = 0.0
    stopped = False
    while any(th.is_alive() for th in threads):
        time.sleep(0.1)
        if stop is not None and not stopped:
            stopped = bool(stop())
        if stopped or time.monotonic() - last < (0.25 if tty else 1.0):
            continue
        last = time.monotonic()
        try:
            st = broker_stats(name, timeout=1)
        except PktipcError:
            continue
        c = st.counters
        kernel = sum(s.kernel_drops or 0 for s in st.sources)
        per = "  ".join(f"{t.name} {t.packets}" for t in tallies)
        line = (f"  {c.packets:>8} packets {c.bytes / 1e6:7.2f} MB in | {per} | "
                f"slabs free {st.slabs.free}/{st.slabs.count} | "
                f"drops: kernel {kernel} broker {c.broker_drops} "
                f"clients {c.client_drops}")
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
    for th in threads:
        th.join()
    if tty:
        print()


def _stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in (p.stdout, p.stderr):
        if f:
            f.close()


def _summary(tallies: list[Tally], claim: str, ok: bool) -> bool:
    print(f"\n{'client':<10} {'packets':>9} {'MB':>8} {'batches':>8} {'seconds':>8} "
          f"{'in order':>9}")
    for t in tallies:
        print(f"{t.name:<10} {t.packets:>9} {t.bytes / 1e6:>8.2f} {t.batches:>8} "
              f"{t.seconds:>8.2f} {'yes' if t.seqs_in_order else 'NO':>9}")
        if t.error:
            print(f"  {t.name}: {t.error}")
    ok = ok and not any(t.error for t in tallies)
    print(f"\n{claim}: {'yes' if ok else 'NO'}")
    return ok
