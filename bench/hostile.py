"""Hostile load: what peers that break the rules cost a broker and its good
clients.

    .venv/bin/python -m bench.hostile            # about 35 minutes
    .venv/bin/python -m bench.hostile --quick    # about 7 minutes
    .venv/bin/python -m bench.hostile --only fuzz,floods,unread,stalled,fds

Five parts, each measured side by side in one invocation (variants in
alternating order over repetitions; medians, and the spread min-max):

  fuzz     a million hostile control messages (bench/_hostileproc.py
           `hostile`: tests/test_fuzz_live.py's frames, stolen names,
           releases of batches not held, STATS and heartbeat floods,
           multi-part messages, ROUTER and REQ peers) against a broker
           replaying a capture at 20,000 packets/s to two good clients, one
           `block` and one `drop`, which check every packet byte for byte;
           the broker answers every one of them (--control-rate 1e9). A
           quiet phase before and after: broker deaths, the good clients'
           losses in each phase, broker memory (private and PSS) before,
           after and at its peak
  floods   two good NumPy clients of a replay as fast as they go, beside a
           process that sleeps (none), one that only burns a CPU (spin), a
           STATS flood (a process not attached), a heartbeat flood (an
           attached client), a STATS flood that reconnects when cut off, and
           one from a new process for every 300 messages; the broker's
           defaults (--control-rate 50): the rate of each against none
  unread   1, 10 and 100 peers that send STATS within their budget and never
           read the replies: the broker's memory until they are cut off, in
           two waves against one broker
  stalled  on a veth pair in a namespace of its own, a `drop` client beside
           0, 1, 4 and 32 `drop` clients that attach one after another, ask
           for all the credit they can and never read, at a fixed rate and as
           fast as the generator goes (--max-clients 40 --slabs 161: each
           holds at most 4 slabs)
  fds      1,100 connections against a broker of `nobody`'s whose limit on
           open files is 1,024, while it serves a client: up, refusals counted

Writes bench/results/hostile-<date>.json and prints the tables; bench.suite
runs it too and puts them in bench/README.md. Needs root (namespaces,
`nobody`, prlimit) and gcc. Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pktipc
from bench.live import proc_cpu
from bench.offline import BASELINES, CLIENT, ROOT, MemSampler, Procs, machine, save
from pktipc._tools.netns import Namespace
from pktipc._tools.synth import write_pcap

PY = sys.executable
PROC = ROOT / "bench" / "_hostileproc.py"
PCAPS = ROOT.parent / "shared" / "pcaps" / "tcpdump-tests"
NOBODY = 65534
PARTS = ("fuzz", "floods", "unread", "stalled", "fds")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> list[float]:
    return [min(xs), max(xs)] if xs else []


# --- memory ---------------------------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """A process's memory, kB: private (RssAnon + RssFile, as the other
    benchmarks report it), shared (RssShmem: the segment's pages it
    touched), and the proportional split from smaps_rollup."""
    out: dict[str, int] = {}
    for f in ("status", "smaps_rollup"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{f}").read_text().splitlines():
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Pss", "Pss_Anon",
                         "Pss_File", "Pss_Shmem"):
                    out[k] = int(v.split()[0])
    if "RssAnon" not in out:
        return {}
    return {"private_kb": out["RssAnon"] + out["RssFile"], "anon_kb": out["RssAnon"],
            "shared_kb": out["RssShmem"], "rss_kb": out["VmRSS"], "pss_kb": out.get("Pss", 0),
            "pss_private_kb": out.get("Pss_Anon", 0) + out.get("Pss_File", 0),
            "pss_shmem_kb": out.get("Pss_Shmem", 0)}


def _peak_private(m: MemSampler) -> int:
    return int(max((s["RssAnon"] + s["RssFile"] for _, s in m.samples), default=0))


# --- set-up ---------------------------------------------------------------------------


class Env:
    """A runtime directory of the benchmark's own, its processes (each
    ended by its pid), and the brokers whose segments it removes if one of
    them could not."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runtime = tmp / "run"
        self.runtime.mkdir(mode=0o700)
        self._saved_runtime = os.environ.get("PKTIPC_RUNTIME_DIR")
        os.environ["PKTIPC_RUNTIME_DIR"] = str(self.runtime)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs = Procs()
        self.n = 0
        self.ns: Namespace | None = None
        self.files: list[Path] = []

    def shm(self, tag: str) -> Path:
        """A capture's path in /dev/shm (in memory: its pages are the
        broker's shared memory, not its private memory), removed at the end."""
        p = Path(f"/dev/shm/pktipc-hostile-{os.getpid()}-{tag}.pcap")
        self.files.append(p)
        return p

    def name(self, tag: str) -> str:
        self.n += 1
        return f"hb{os.getpid()}-{tag}{self.n}"

    def start(self, argv: list[str], *, out: bool = True, err: Path | None = None,
              cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        with open(err or os.devnull, "wb") as e:
            return self.procs.start(argv, env=self.env, cwd=cwd, stderr=e,
                                    stdout=subprocess.PIPE if out else subprocess.DEVNULL)

    def broker(self, name: str, *args: str, wrap: tuple[str, ...] = (),
               runtime: Path | None = None) -> subprocess.Popen[bytes]:
        self.procs.brokers.append(name)
        argv = [*wrap, PY, "-m", "pktipc", "serve", "--name", name, *args]
        # (cwd /: a broker run as another user may not be able to enter ROOT)
        p = self.start(argv, out=False, err=self.tmp / f"{name}.err", cwd=Path("/"))
        sock = (runtime or self.runtime) / f"{name}.ctl"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker {name} did not start: {self.stderr(name)}")
            time.sleep(0.01)
        return p

    def stderr(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / f"{name}.err").read_text()
        return ""

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM, and its exit status (-9: it had to be killed)."""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs.kill(p)
            p.wait()
            return -9

    def output(self, p: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
        out, _ = p.communicate(timeout=timeout)
        self.procs.live.pop(p.pid, None)
        lines = out.decode().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def netns(self) -> str:
        """A namespace of the benchmark's own with a veth pair va-vb."""
        if self.ns is None:
            ns = Namespace(f"pktipc-hostile-{os.getpid()}")
            try:
                ns.veth("va", "vb")
            except BaseException:
                ns.delete()
                raise
            self.ns = ns
        return self.ns.name

    def nsx(self) -> tuple[str, ...]:
        """The prefix that runs a command inside that namespace."""
        self.netns()
        assert self.ns is not None
        return tuple(self.ns.cmd())

    def close(self) -> None:
        self.procs.kill_all()
        for f in self.files:
            f.unlink(missing_ok=True)
        if self.ns is not None:
            self.ns.delete()
            self.ns = None
        if self._saved_runtime is None:
            os.environ.pop("PKTIPC_RUNTIME_DIR", None)
        else:
            os.environ["PKTIPC_RUNTIME_DIR"] = self._saved_runtime


def stats(name: str) -> Mapping[str, Any]:
    return pktipc.broker_stats(name, timeout=10).reply


def synth(path: Path, packets: int, rate: float, sizes: tuple[int, ...] | None = None) -> Path:
    with open(path, "wb", buffering=1 << 20) as f:
        if sizes:
            write_pcap(f, packets, rate_pps=rate, sizes=sizes, flows=256)
        else:
            write_pcap(f, packets, rate_pps=rate, flows=256)
    return path


class StatsSampler(threading.Thread):
    """The broker's STATS every `every` seconds, summed up: slabs free, and
    what clients other than `good` hold."""

    def __init__(self, name: str, good: set[str], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.name, self.good, self.every = name, good, every
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            try:
                st = stats(self.name)
            except pktipc.PktipcError:
                continue
            others = [c for c in st["clients"] if c["name"] not in self.good]
            self.samples.append({
                "t": time.monotonic(), "free": st["slabs"]["free"],
                "others": len(others), "others_held": sum(c["held"] for c in others),
                "others_owed": sum(c["held"] + c["queued"] for c in others),
                "good": {c["name"]: [c["held"], c["queued"], c["drops"]]
                         for c in st["clients"] if c["name"] in self.good},
                "private_kb": memory(st["pid"]).get("private_kb")})

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join()
        s = self.samples
        return {"samples": len(s),
                "min_free_slabs": min((x["free"] for x in s), default=None),
                "max_hostile_clients": max((x["others"] for x in s), default=0),
                "max_slabs_held_by_hostile": max((x["others_held"] for x in s), default=0),
                "max_batches_owed_to_hostile": max((x["others_owed"] for x in s), default=0),
                "series": s}


# --- (a) a million hostile messages ---------------------------------------------------------


def fuzz_run(env: Env, pcap: Path, messages: int, senders: int, quiet: float,
             seed: int) -> dict[str, Any]:
    name = env.name("fuzz")
    broker = env.broker(name, "-r", str(pcap), "--loop", "0", "--realtime",
                        "--wait-clients", "2", "--control-rate", "1e9")
    good = {"good-block": "block", "good-drop": "drop"}
    clients = {n: env.start([PY, str(PROC), "good", name, n, pol, str(pcap)],
                            err=env.tmp / f"{n}.err") for n, pol in good.items()}
    mem = MemSampler(broker.pid, every=0.1)
    mem.start()
    deadline = time.monotonic() + 30
    while len(stats(name)["clients"]) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the good clients did not attach")
        time.sleep(0.05)
    sampler = StatsSampler(name, set(good))
    phases: dict[str, dict[str, Any]] = {}
    alive = True

    def mark(phase: str) -> None:
        nonlocal alive
        alive = alive and broker.poll() is None
        st = stats(name)
        per = {c["name"]: c for c in st["clients"]}
        phases[phase] = {"t": time.monotonic(), "packets": st["counters"]["packets"],
                         "batches": st["counters"]["batches"],
                         "drops": {n: per[n]["drops"] for n in good if n in per},
                         "protocol_errors": st["counters"]["protocol_errors"],
                         "cpu_s": proc_cpu(broker.pid), "memory": memory(broker.pid),
                         "stats": st}

    try:
        time.sleep(quiet)
        mark("start")
        sampler.start()
        t0 = time.monotonic()
        per = messages // senders
        hostile = [env.start([PY, str(PROC), "hostile", f"ipc://{env.runtime}/{name}.ctl",
                              str(per + (messages - per * senders if i == 0 else 0)),
                              str(seed + i), ",".join(good)], err=env.tmp / f"hostile{i}.err")
                   for i in range(senders)]
        results = []
        for h in hostile:
            while h.poll() is None:
                alive = alive and broker.poll() is None
                time.sleep(0.2)
            results.append(env.output(h))
        hostile_s = time.monotonic() - t0
        mark("hostile")
        time.sleep(quiet)
        mark("after")
        load = sampler.stop()
    finally:
        rc = env.stop(broker)
        mem.stop()
    outs = {n: env.output(p) for n, p in clients.items()}
    err = env.stderr(name)
    p0, p1, p2 = phases["start"], phases["hostile"], phases["after"]
    c0, c2 = p0["stats"], p2["stats"]
    return {
        "messages": sum(r["messages"] for r in results), "senders": senders,
        "hostile_s": hostile_s, "quiet_s": quiet,
        "broker_cores": {"quiet_before": p0["cpu_s"] / quiet,
                         "hostile": (p1["cpu_s"] - p0["cpu_s"]) / (p1["t"] - p0["t"]),
                         "after": (p2["cpu_s"] - p1["cpu_s"]) / (p2["t"] - p1["t"])},
        "broker_alive": alive, "broker_exit": rc, "traceback": "Traceback" in err,
        "good": outs,
        "good_drops": {ph: {n: phases[b]["drops"][n] - phases[a]["drops"][n] for n in good}
                       for ph, a, b in (("hostile", "start", "hostile"),
                                        ("after", "hostile", "after"))},
        "packets": {"quiet_before": p0["packets"], "hostile": p1["packets"] - p0["packets"],
                    "after": p2["packets"] - p1["packets"]},
        "packets_per_batch": (p2["packets"] - p0["packets"]) / max(1, p2["batches"]
                                                                   - p0["batches"]),
        "memory": {"before": p0["memory"], "after_hostile": p1["memory"],
                   "after_quiet": p2["memory"], "peak_private_kb": _peak_private(mem)},
        "protocol_errors": p1["protocol_errors"] - p0["protocol_errors"],
        "errors_received": sum(sum(r["error_codes"].values()) for r in results),
        "fences_unanswered": sum(r["fences_unanswered"] for r in results),
        "connections": sum(r["connections"] for r in results),
        "welcomed": sum(r["welcomed"] for r in results),
        "control": c2["control"], "refused": c2["refused"],
        "evictions": c2["counters"]["evictions"] - c0["counters"]["evictions"],
        "clients_total": c2["counters"]["clients_total"],
        "hostile_clients_drops": c2["counters"]["client_drops"] - sum(
            c["drops"] for c in c2["clients"] if c["name"] in good),
        "load": load, "senders_detail": results,
    }


def fuzz(env: Env, quick: bool, reps: int, messages: int | None) -> dict[str, Any]:
    n = messages or (100_000 if quick else 1_000_000)
    quiet = 5.0 if quick else 15.0
    pcap = synth(env.shm("fuzz"), 20_000, 20_000)
    runs = []
    for rep in range(reps):
        r = fuzz_run(env, pcap, n, 2, quiet, 20240611 + 1000 * rep)
        g = r["good"]
        print(f"  fuzz rep {rep}: {r['messages']} messages in {r['hostile_s']:.0f} s, broker "
              f"{'up' if r['broker_alive'] else 'DOWN'} (exit {r['broker_exit']}); good: "
              + ", ".join(f"{k} {v['packets']} packets, {v['mismatched']} wrong, "
                          f"{v['gap_packets']} skipped" for k, v in g.items())
              + f"; private {r['memory']['before']['private_kb'] / 1024:.1f} -> "
              f"{r['memory']['after_quiet']['private_kb'] / 1024:.1f} MiB", flush=True)
        runs.append(r)
    return {"runs": runs, "messages": n, "quiet_s": quiet}


# --- (b) floods against none ------------------------------------------------------------------

FLOODS = ("none", "spin", "stats", "heartbeat", "reconnect", "fork")


def flood_run(env: Env, pcap: Path, loops: int, slab_args: list[str],
              kind: str) -> dict[str, Any]:
    name = env.name("flood")
    broker = env.broker(name, "-r", str(pcap), "--loop", str(loops), "--wait-clients", "2",
                        "--linger", *slab_args)
    clients = [env.start([PY, str(CLIENT), name, f"good{i}", "numpy"]) for i in range(2)]
    flooder = None
    try:
        deadline = time.monotonic() + 30
        while len(stats(name)["clients"]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the good clients did not attach")
            time.sleep(0.01)
        # The stream has started. Every variant starts a process (none: one
        # that only sleeps), so that what starting one costs is in all.
        cpu0 = proc_cpu(broker.pid)
        flooder = env.start([PY, str(PROC), "flood", f"ipc://{env.runtime}/{name}.ctl",
                             kind, "600"])
        outs = [env.output(c, timeout=600) for c in clients]
        broker_cpu = proc_cpu(broker.pid) - cpu0
        st = stats(name)
        alive = broker.poll() is None
    finally:
        flooder_cpu = float("nan")
        if flooder is not None:
            flooder.send_signal(signal.SIGTERM)    # (fork: it waits for its children)
            _, ru = env.procs.reap(flooder)         # its children's CPU included
            if ru is not None:
                flooder_cpu = ru.ru_utime + ru.ru_stime
        rc = env.stop(broker)
    t_go = max(o["t_attached"] for o in outs)
    wall = max(o["t_end"] for o in outs) - t_go
    delivered = sum(o["packets"] for o in outs)
    return {"kind": kind, "pps": min(o["packets"] / (o["t_end"] - t_go) for o in outs),
            "wall_s": wall, "broker_cpu_s": broker_cpu,
            "broker_cpu_s_per_M": broker_cpu / (delivered / 2 / 1e6),
            "clients_cpu_s": sum(o["cpu_stream_s"] for o in outs), "flooder_cpu_s": flooder_cpu,
            "packets": [o["packets"] for o in outs],
            "gaps": sum(o["gap_packets"] for o in outs), "broker_alive": alive,
            "broker_exit": rc, "control": st["control"],
            "evictions": st["counters"]["evictions"]}


def floods(env: Env, quick: bool, reps: int) -> dict[str, Any]:
    settings = [
        ("16 KiB slabs, resp_1_benchmark.pcap", PCAPS / "resp_1_benchmark.pcap",
         ["--slab-size", "16k"], 20_000 if quick else 25_000),
        ("1 MiB slabs (default), 64-1514 B frames",
         synth(env.shm("floods"), 200_000, 1e6), [], 80 if quick else 160),
    ]
    runs = []
    for rep in range(reps):
        order = list(FLOODS) if rep % 2 == 0 else list(FLOODS)[::-1]
        for label, pcap, slab_args, loops in settings:
            for kind in order:
                r = flood_run(env, pcap, loops, slab_args, kind)
                r.update(setting=label, rep=rep)
                runs.append(r)
                print(f"  floods {label}, {kind}: {r['pps'] / 1e6:.3f} M/s per client, "
                      f"cut {r['control']['connections_cut']}, refused "
                      f"{r['control']['connections_refused']}, over budget "
                      f"{r['control']['messages_over_budget']}", flush=True)
    summary = []
    for label, *_ in settings:
        base = {r["rep"]: r["pps"] for r in runs if (r["setting"], r["kind"]) == (label, "none")}
        for kind in FLOODS:
            rs = [r for r in runs if (r["setting"], r["kind"]) == (label, kind)]
            ratios = [r["pps"] / base[r["rep"]] for r in rs]
            summary.append({
                "setting": label, "kind": kind, "pps": _med([r["pps"] for r in rs]),
                "spread": _spread([r["pps"] for r in rs]), "ratio": _med(ratios),
                "ratio_spread": _spread(ratios),
                "complete": all(len(set(r["packets"])) == 1 and not r["gaps"] for r in rs),
                "broker_up": all(r["broker_alive"] and r["broker_exit"] == 0 for r in rs),
                "cut": _med([r["control"]["connections_cut"] for r in rs]),
                "refused": _med([r["control"]["connections_refused"] for r in rs]),
                "over_budget": _med([r["control"]["messages_over_budget"] for r in rs]),
                "handshakes_failed": _med([r["control"]["handshakes_failed"] for r in rs]),
                "broker_cpu_s_per_M": _med([r["broker_cpu_s_per_M"] for r in rs]),
                "flooder_cores": _med([r["flooder_cpu_s"] / r["wall_s"] for r in rs]),
                "broker_cores": _med([r["broker_cpu_s"] / r["wall_s"] for r in rs])})
    return {"runs": runs, "summary": summary}


# --- (c) peers that never read ------------------------------------------------------------------


def unread_run(env: Env, pcap: Path, peers: int, waves: int) -> dict[str, Any]:
    """`waves` times, `peers` processes that never read, until the broker has
    cut them all off: memory before, at the peak, and after each wave."""
    name = env.name("unread")
    broker = env.broker(name, "-r", str(pcap), "--loop", "0", "--realtime")
    reader = env.start([PY, str(CLIENT), name, "good", "numpy"])
    out: dict[str, Any] = {"peers": peers, "waves": []}
    try:
        deadline = time.monotonic() + 30
        while len(stats(name)["clients"]) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the good client did not attach")
            time.sleep(0.05)
        time.sleep(3)
        out["before"] = memory(broker.pid)
        out["reply_bytes"] = len(pktipc._protocol.encode("stats_reply", stats=stats(name)))
        cut0 = 0
        for _ in range(waves):
            mem = MemSampler(broker.pid, every=0.05)
            mem.start()
            t0 = time.monotonic()
            # Within the default budget (50 a second, a burst of 200): the
            # replies pile up until the queue toward the peer is full.
            ps = [env.start([PY, str(PROC), "unread", f"ipc://{env.runtime}/{name}.ctl", "45",
                             "190", "300"]) for _ in range(peers)]
            cut_at = None
            while time.monotonic() - t0 < 240:
                cut = stats(name)["control"]["connections_cut"] - cut0
                if cut >= peers:
                    cut_at = time.monotonic() - t0
                    break
                time.sleep(0.5)
            for p in ps:
                env.stop(p)
            sent = sum(env.output(p).get("sent", 0) for p in ps)
            time.sleep(1)
            mem.stop()
            st = stats(name)
            cut0 = st["control"]["connections_cut"]
            out["waves"].append({"cut_after_s": cut_at, "sent": sent,
                                 "peak_private_kb": _peak_private(mem),
                                 "peak_anon_kb": max((s["RssAnon"] for _, s in mem.samples),
                                                     default=0),
                                 "after": memory(broker.pid), "control": st["control"]})
        out["broker_alive"] = broker.poll() is None
    finally:
        out["broker_exit"] = env.stop(broker)
        env.stop(reader)
    return out


def unread(env: Env, quick: bool, reps: int) -> dict[str, Any]:
    pcap = synth(env.shm("unread"), 20_000, 20_000)
    counts = (1, 10) if quick else (1, 10, 100)
    runs = []
    for rep in range(reps):
        for peers in (counts if rep % 2 == 0 else counts[::-1]):
            r = unread_run(env, pcap, peers, 2)
            r["rep"] = rep
            runs.append(r)
            print(f"  unread {peers} peers: private {r['before']['private_kb'] / 1024:.1f} MiB, "
                  + "; ".join(f"wave {i + 1}: peak {w['peak_private_kb'] / 1024:.1f}, after "
                              f"{w['after']['private_kb'] / 1024:.1f} MiB, all cut after "
                              f"{w['cut_after_s']} s" for i, w in enumerate(r["waves"])),
                  flush=True)
    return {"runs": runs}


# --- (d) stalled drop clients -----------------------------------------------------------------

STALLED = (0, 1, 4, 32)


def stalled_run(env: Env, gen: Path, stalled_n: int, seconds: float,
                rate: float) -> dict[str, Any]:
    """A `drop` client reads a live interface while `stalled_n` clients
    attach one after another during the first half of the traffic (so that
    each holds other slabs), take all the credit they may and never read."""
    nsx = env.nsx()
    name = env.name("stall")
    broker = env.broker(name, "-i", "va", "--max-clients", "40", "--slabs", "161",
                        "--liveness", "3600", "--lease", "0", wrap=nsx)
    idle = None
    count = int((rate or 500_000) * seconds)
    try:
        good = env.start([PY, str(CLIENT), name, "good", "numpy"])
        deadline = time.monotonic() + 30
        while len(stats(name)["clients"]) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the good client did not attach")
            time.sleep(0.05)
        sampler = StatsSampler(name, {"good"}, every=0.25)
        sampler.start()
        g = env.start([*nsx, str(gen), "vb", str(count), "64", str(rate)])
        if stalled_n:
            idle = env.start([PY, str(PROC), "stalled", name, str(stalled_n),
                              str(seconds / 2 / stalled_n)])
        out_g, _ = g.communicate(timeout=seconds * 10 + 60)
        env.procs.live.pop(g.pid, None)
        _, sent, _, secs = out_g.decode().split()
        welcome = json.loads(idle.stdout.readline()) if idle and idle.stdout else {}
        time.sleep(1.0)
        st = stats(name)
        load = sampler.stop()
        alive = broker.poll() is None
        rc = env.stop(broker)
        out = env.output(good)
    finally:
        env.stop(broker)
        if idle is not None:
            env.stop(idle)
    per = {c["name"]: c for c in st["clients"]}
    idle_c = [c for n, c in per.items() if n.startswith("stalled")]
    return {
        "stalled": stalled_n, "rate": rate, "sent": int(sent), "gen_s": float(secs),
        "delivered": out["packets"], "gap_packets": out["gap_packets"],
        "good_drops": per["good"]["drops"], "batches": st["counters"]["batches"],
        "kernel_drops": sum(s["kernel_drops"] for s in st["sources"]),
        "broker_drops": st["counters"]["broker_drops"],
        "stalled_credit": welcome["credit"][0] if welcome else None,
        "stalled_held": sum(c["held"] for c in idle_c),
        "stalled_drops": sum(c["drops"] for c in idle_c),
        "min_free_slabs": load["min_free_slabs"],
        "broker_alive": alive, "broker_exit": rc,
    }


def stalled(env: Env, quick: bool, reps: int) -> dict[str, Any]:
    gen = env.tmp / "gen"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(gen),
                    str(BASELINES / "gen.c")], check=True)
    seconds = 4.0 if quick else 10.0
    runs = []
    for rep in range(reps):
        for rate in (200_000.0, 0.0):
            for k in (STALLED if rep % 2 == 0 else STALLED[::-1]):
                r = stalled_run(env, gen, k, seconds, rate)
                r["rep"] = rep
                runs.append(r)
                print(f"  stalled {k} at {rate or 'max'}: sent {r['sent']} in {r['batches']} "
                      f"batches, good got {r['delivered']} (skipped {r['good_drops']}), kernel "
                      f"drops {r['kernel_drops']}, stalled held {r['stalled_held']} and lost "
                      f"{r['stalled_drops']}, fewest free slabs {r['min_free_slabs']}",
                      flush=True)
    summary = []
    for rate in (200_000.0, 0.0):
        for k in STALLED:
            rs = [r for r in runs if (r["rate"], r["stalled"]) == (rate, k)]
            fr = [r["delivered"] / r["sent"] for r in rs]
            summary.append({
                "rate": rate, "stalled": k, "delivered_fraction": _med(fr),
                "spread": _spread(fr), "offered_pps": _med([r["sent"] / r["gen_s"] for r in rs]),
                "good_drops": max(r["good_drops"] for r in rs),
                "gap_packets": max(r["gap_packets"] for r in rs),
                "kernel_drops": _med([r["kernel_drops"] for r in rs]),
                "kernel_drops_max": max(r["kernel_drops"] for r in rs),
                "broker_drops": max(r["broker_drops"] for r in rs),
                "stalled_held": _med([r["stalled_held"] for r in rs]),
                "stalled_drops": _med([r["stalled_drops"] for r in rs]),
                "min_free_slabs": min(r["min_free_slabs"] for r in rs),
                "credit": rs[0]["stalled_credit"],
                "broker_up": all(r["broker_alive"] and r["broker_exit"] == 0 for r in rs)})
    return {"runs": runs, "summary": summary, "options": "--max-clients 40 --slabs 161 "
            "--liveness 3600 --lease 0 (1 MiB slabs and blocks)"}


# --- (e) 1,100 connections against 1,024 files -----------------------------------------------


def fds_run(env: Env, pcap: Path) -> dict[str, Any]:
    import zmq

    top = Path(tempfile.mkdtemp(prefix="pktipc-hostile-fds-"))
    os.chmod(top, 0o755)
    run = top / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    name = env.name("fds")
    wrap = ("prlimit", "--nofile=1024:1024", "setpriv", f"--reuid={NOBODY}",
            f"--regid={NOBODY}", "--clear-groups")
    saved = dict(env.env), os.environ["PKTIPC_RUNTIME_DIR"]
    env.env["PKTIPC_RUNTIME_DIR"] = os.environ["PKTIPC_RUNTIME_DIR"] = str(run)
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.MAX_SOCKETS = 4000
    socks: list[zmq.Socket[bytes]] = []
    try:
        broker = env.broker(name, "-r", str(pcap), "--loop", "0", "--realtime",
                            "--linger", "--max-clients", "1000", "--max-connections", "5000",
                            wrap=wrap, runtime=run)
        reader = env.start([PY, str(PROC), "good", name, "good", "drop", str(pcap)])
        deadline = time.monotonic() + 30
        while len(stats(name)["clients"]) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the good client did not attach")
            time.sleep(0.05)
        before = stats(name)["clients"][0]["packets"]
        t0 = time.monotonic()
        for _ in range(1100):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{run}/{name}.ctl")
            socks.append(s)
        time.sleep(3)
        # (Its own connection for STATS would be refused now: the count after.)
        alive_during = broker.poll() is None
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(1)
        alive = broker.poll() is None
        st = stats(name) if alive else {"control": {}, "clients": []}
        served = st["clients"][0]["packets"] - before if st["clients"] else 0
        rc = env.stop(broker)
        out = env.output(reader)
    finally:
        for s in socks:
            s.close()
        ctx.term()
        env.env.clear()
        env.env.update(saved[0])
        os.environ["PKTIPC_RUNTIME_DIR"] = saved[1]
        env.procs.kill_all()            # (only if something above failed)
        left = list(Path("/dev/shm").glob(f"pktipc.{name}.*"))
        for p in [*left, *run.iterdir()]:
            p.unlink()
        run.rmdir()
        top.rmdir()
    err = env.stderr(name)
    return {"alive_during": alive_during, "alive": alive, "broker_exit": rc,
            "stderr_tail": err[-600:],
            "control": st["control"],
            "seconds": time.monotonic() - t0, "served_meanwhile": served,
            "good_packets": out.get("packets"), "good_mismatched": out.get("mismatched"),
            "good_gap_packets": out.get("gap_packets"), "segment_left": bool(left),
            "cap_message": next((line for line in err.splitlines() if "at most" in line), "")}


def fds(env: Env, quick: bool, reps: int) -> dict[str, Any]:
    pcap = synth(env.shm("fds"), 20_000, 20_000)
    runs = []
    for rep in range(reps):
        r = fds_run(env, pcap)
        r["rep"] = rep
        runs.append(r)
        c = r["control"]
        if not r["alive"]:
            print(f"  fds: broker DOWN (exit {r['broker_exit']}): {r['stderr_tail']}", flush=True)
            continue
        print(f"  fds: broker {'up' if r['alive'] else 'DOWN'} (exit {r['broker_exit']}), "
              f"refused {c['connections_refused']} of 1100 (max {c['max_connections']}), "
              f"served {r['served_meanwhile']} packets meanwhile", flush=True)
    return {"runs": runs}


# --- report -----------------------------------------------------------------------------------


def _mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def tables(res: dict[str, Any]) -> str:
    out = []
    if "fuzz" in res:
        runs = res["fuzz"]["runs"]
        out += [f"**A million hostile control messages** ({res['fuzz']['messages']:,} a run, "
                f"{len(runs)} run(s), one line each; a replay at 20,000 packets/s, "
                f"{res['fuzz']['quiet_s']:g} s quiet before and after)\n",
                "| run | messages | in s | broker | good `block`: packets, wrong, skipped | "
                "good `drop`: packets, wrong | skipped for the `drop` one: quiet / hostile / "
                "quiet (a second) | broker private MiB: before → after hostile → after quiet "
                "(peak) | private PSS MiB, before → after | broker cores: quiet / hostile | "
                "ERRORs |", "|---:|---:|---:|---|---|---|---|---|---|---|---:|"]
        for i, r in enumerate(runs):
            b, d = r["good"]["good-block"], r["good"]["good-drop"]
            m = r["memory"]
            dd = r["good_drops"]
            skips = [d["gap_packets"] - dd["hostile"]["good-drop"] - dd["after"]["good-drop"],
                     dd["hostile"]["good-drop"], dd["after"]["good-drop"]]
            secs = [r["quiet_s"], r["hostile_s"], r["quiet_s"]]
            up = ("up, exit 0" if r["broker_alive"] and r["broker_exit"] == 0
                  and not r["traceback"] else f"DOWN (exit {r['broker_exit']})")
            cores = r.get("broker_cores", {})
            out.append(
                f"| {i + 1} | {r['messages']:,} | {r['hostile_s']:.0f} | {up} | "
                f"{b['packets']:,}, {b['mismatched']}, {b['gap_packets']} | "
                f"{d['packets']:,}, {d['mismatched']} | "
                + " / ".join(f"{k:,}" for k in skips)
                + " (" + " / ".join(f"{k / t:.0f}" for k, t in zip(skips, secs, strict=True))
                + f") | {_mib(m['before']['private_kb'])} → "
                f"{_mib(m['after_hostile']['private_kb'])} → "
                f"{_mib(m['after_quiet']['private_kb'])} ({_mib(m['peak_private_kb'])}) | "
                f"{_mib(m['before']['pss_private_kb'])} → "
                f"{_mib(m['after_quiet']['pss_private_kb'])} | "
                f"{cores.get('quiet_before', 0):.2f} / {cores.get('hostile', 0):.2f} | "
                f"{r['protocol_errors']:,} |")
        out.append("")
    if "floods" in res:
        out += ["**Floods**: the slower good client's rate, against no flood in the same "
                "repetition\n",
                "| replay | flood | M packets/s per client | ÷ no flood | every packet | "
                "connections cut | refused | handshakes failed | messages over budget | "
                "broker CPU s per M packets | broker, flooder: cores busy |",
                "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for s in res["floods"]["summary"]:
            out.append(f"| {s['setting']} | {s['kind']} | {s['pps'] / 1e6:.3f} "
                       f"({'–'.join(f'{x / 1e6:.3f}' for x in s['spread'])}) | "
                       f"**{s['ratio']:.2f}** ({'–'.join(f'{x:.2f}' for x in s['ratio_spread'])})"
                       f" | {'yes' if s['complete'] else 'NO'} | {s['cut']:.0f} | "
                       f"{s['refused']:.0f} | {s['handshakes_failed']:.0f} | "
                       f"{s['over_budget']:,.0f} | {s['broker_cpu_s_per_M']:.3f} | "
                       f"{s['broker_cores']:.2f}, {s['flooder_cores']:.2f} |")
        out.append("")
    if "unread" in res:
        out += ["**Peers that never read** (STATS within the default budget, the replies never "
                "read; two waves of new peers against one broker)\n",
                "| peers | broker private MiB: before → peak, after wave 1 → peak, after wave 2 | "
                "anon MiB before → after | STATS reply, bytes | all cut off after, s |",
                "|---:|---|---|---:|---|"]
        for r in res["unread"]["runs"]:
            w = r["waves"]
            out.append(f"| {r['peers']} | {_mib(r['before']['private_kb'])} → " + " → ".join(
                f"{_mib(x['peak_private_kb'])}, {_mib(x['after']['private_kb'])}" for x in w)
                + f" | {_mib(r['before']['anon_kb'])} → "
                + " → ".join(_mib(x["after"]["anon_kb"]) for x in w)
                + f" | {r['reply_bytes']:,} | "
                + ", ".join("not within 240" if x["cut_after_s"] is None
                            else f"{x['cut_after_s']:.0f}" for x in w) + " |")
        out.append("")
    if "stalled" in res:
        out += [f"**A `drop` client beside stalled `drop` clients** "
                f"({res['stalled']['options']})\n",
                "| offered | stalled | delivered to the good client (spread) | skipped for it "
                "| kernel drops | broker drops | slabs the stalled hold | fewest slabs free | "
                "packets skipped for the stalled |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in res["stalled"]["summary"]:
            rate = (f"{s['rate'] / 1e3:.0f} k/s" if s["rate"] else
                    f"max ({s['offered_pps'] / 1e6:.2f} M/s)")
            out.append(f"| {rate} | {s['stalled']} | {s['delivered_fraction']:.4f} "
                       f"({'–'.join(f'{x:.4f}' for x in s['spread'])}) | {s['good_drops']} | "
                       f"{s['kernel_drops']:.0f} (max {s['kernel_drops_max']}) | "
                       f"{s['broker_drops']} | {s['stalled_held']:.0f} | {s['min_free_slabs']} | "
                       f"{s['stalled_drops']:,.0f} |")
        out.append("")
    if "fds" in res:
        out += ["**1,100 connections against a limit of 1,024 open files** (broker as "
                "`nobody`)\n",
                "| run | broker | connections admitted at most | refused | handshakes failed | "
                "accepts that waited for room | packets served meanwhile | "
                "good client: wrong, skipped | segment left |",
                "|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for i, r in enumerate(res["fds"]["runs"]):
            c = r["control"]
            if not r["alive"]:
                why = r.get("stderr_tail", "").strip().splitlines()[-1:] or ["?"]
                out.append(f"| {i + 1} | **DOWN** (exit {r['broker_exit']}: `{why[0]}`) "
                           "| | | | | | | |")
                continue
            up = "up, exit 0" if r["broker_exit"] == 0 else f"exit {r['broker_exit']}"
            out.append(f"| {i + 1} | {up} | {c['max_connections']} | "
                       f"{c['connections_refused']} | {c['handshakes_failed']} | "
                       f"{c.get('accepts_deferred', 0)} | "
                       f"{r['served_meanwhile']:,} | {r['good_mismatched']}, "
                       f"{r['good_gap_packets']} | {'yes' if r['segment_left'] else 'no'} |")
        out.append("")
    return "\n".join(out)


def run(quick: bool, reps: int | None = None, only: list[str] | None = None,
        messages: int | None = None) -> dict[str, Any]:
    parts = only or list(PARTS)
    res: dict[str, Any] = {"machine": machine(), "quick": quick}
    plan: dict[str, Callable[[Env], dict[str, Any]]] = {
        "fuzz": lambda e: fuzz(e, quick, reps or (1 if quick else 3), messages),
        "floods": lambda e: floods(e, quick, reps or (2 if quick else 5)),
        "unread": lambda e: unread(e, quick, reps or 1),
        "stalled": lambda e: stalled(e, quick, reps or (1 if quick else 3)),
        "fds": lambda e: fds(e, quick, reps or (1 if quick else 3)),
    }
    with tempfile.TemporaryDirectory(prefix="pktipc-hostile-") as tmpdir:
        env = Env(Path(tmpdir))
        try:
            for part in parts:
                print(f"hostile: {part}", flush=True)
                try:
                    res[part] = plan[part](env)
                except Exception:           # (the other parts still run, and are saved)
                    res.setdefault("failed", {})[part] = traceback.format_exc()
                    print(f"hostile: {part} failed:\n{res['failed'][part]}", flush=True)
                    env.procs.kill_all()
        finally:
            env.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages, shorter runs, "
                    "fewer repetitions")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--only", help="comma-separated parts, of: " + ",".join(PARTS))
    ap.add_argument("--messages", type=int, help="hostile messages a fuzz run "
                    "(default 1,000,000; --quick 100,000)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.hostile needs root (namespaces, user nobody, prlimit)", file=sys.stderr)
        return 1
    started = time.monotonic()
    res = run(a.quick, a.reps, a.only.split(",") if a.only else None, a.messages)
    print("\n" + tables(res))
    save("hostile", a.out, started, **res)
    return 1 if res.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
