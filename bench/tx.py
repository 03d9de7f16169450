"""Sending, side by side: frames out of a veth through the broker (serve -i
IFACE --tx) against what a user would run instead, and ping replies of a
host that exists only as a pktipc client against the kernel's own.

    .venv/bin/python -m bench.tx [--quick] [--reps R] [--out FILE] [--no-readme]

TX rate, 64- and 1400-byte frames (a capture file of UDP frames, replayed
LOOPS times; every sender reads it into memory first), as fast as each
sender goes, out of `ta` of a veth pair whose peer `tb` lies in a second
namespace:

  raw       bench/baselines/tpacket_tx.c: a TPACKET_V2 TX ring of its own,
            filled, one send() per ring-full (the ceiling), with
            PACKET_QDISC_BYPASS as the broker below, and through the qdisc
  tcpreplay tcpreplay --topspeed -K (file preloaded) --loop LOOPS
  C         bench/_ctxproc.c: pktipc_tx_alloc, memcpy, pktipc_tx_send, a
            flush at the end, through a broker sending with
            --tx-qdisc-bypass (and once through the qdisc, as raw)
  Python    client.tx(): allocate, copy, send, per frame (fewer frames)
  replay    pktipc replay --topspeed --loop LOOPS

Rate = frames the peer received (tb's rx_packets) / the sender's own time
from its first frame to the last taken (tcpreplay's and pktipc replay's
"sent in"); medians over repetitions in alternating order, spread min-max.
CPU: user + system seconds of the sender's process (and the broker's, for
pktipc) per million frames; the kernel's sending is in the system time.

Ping: `ping -i 0.01` from tb's namespace to an address on ta (the kernel
replies) and to addresses only pktipc-pong (C) and examples/pong.py
answer, through a broker with a 1 ms block timeout: RTT p50 and p99 as ping reports them.

Needs root (namespaces, CAP_NET_RAW), gcc, tcpreplay. Nothing here passes
or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pktipc
from bench.live import proc_cpu
from bench.offline import BASELINES, ROOT, machine, refresh_readme
from pktipc._tools.netns import Namespace

PY = sys.executable
BENCH = ROOT / "bench"
CDIR = ROOT / "clients" / "c"
PONG = CDIR / "build" / "bin" / "pktipc-pong"
SIZES = (64, 1400)
FILE_FRAMES = {64: 50_000, 1400: 20_000}

PYSENDER = r"""
import struct, sys, time
import pktipc
name, client, path, loops = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, "rb").read()
frames, off = [], 24
while off + 16 <= len(data):
    n = struct.unpack_from("<I", data, off + 8)[0]
    frames.append(data[off + 16: off + 16 + n])
    off += 16 + n
with pktipc.connect(name, client) as c:
    with c.tx(frames=4096) as tx:
        tx.allocate(len(frames[0]), 0)          # the area offered, before the clock
        t0 = time.monotonic()
        for _ in range(loops):
            for f in frames:
                buf = tx.allocate(len(f), 0)
                buf[:] = f
                tx.send(buf)
        tx.flush()
        secs = time.monotonic() - t0
    print(f"sent {tx.sent} secs {secs:.6f} refused {tx.refused}")
"""


def write_udp_pcap(path: Path, size: int, n: int) -> None:
    """n Ethernet/IPv4/UDP frames of `size` bytes (for an address nobody has,
    to a MAC nobody has: the peer drops them at once), 64 flows."""
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(n):
            ip_len = size - 14
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, i & 0xFFFF, 0, 64, 17, 0,
                             bytes([10, 78, 0, 1]), bytes([10, 78, 1, i % 64]))
            udp = struct.pack("!HHHH", 1024 + i % 64, 9, ip_len - 20, 0)
            frame = (b"\x02\x00\x00\x00\x00\x0b" + b"\x02\x00\x00\x00\x00\x0a" + b"\x08\x00"
                     + ip + udp)
            frame += bytes(size - len(frame))
            out.write(struct.pack("<IIII", 1_700_000_000 + i // 1000, i % 1000 * 1000,
                                  size, size))
            out.write(frame)


class TxBench:
    def __init__(self, tmp: Path, runtime: Path) -> None:
        self.tmp, self.runtime = tmp, runtime
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp / "tpacket_tx"),
                        str(BASELINES / "tpacket_tx.c")], check=True)
        subprocess.run(["make", "-s", "-C", str(CDIR), "lib", "examples"], check=True)
        libs = subprocess.run(["pkg-config", "--libs", "libzmq", "msgpack"], check=True,
                              capture_output=True, text=True).stdout.split()
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CDIR / 'include'}",
                        f"-I{ROOT / 'shm'}", "-o", str(tmp / "_ctxproc"),
                        str(BENCH / "_ctxproc.c"), str(CDIR / "build" / "lib" / "libpktipc.a"),
                        *libs, "-pthread"], check=True)
        (tmp / "pysender.py").write_text(PYSENDER)
        tag = f"{os.getpid()}"
        self.a = Namespace(f"pktipc-btx-a{tag}")
        self.b = Namespace(f"pktipc-btx-b{tag}")
        try:
            self.a.veth("ta", "tb")
            self.a.ip("link", "set", "tb", "netns", self.b.name)
            self.b.ip("link", "set", "tb", "up")
            self.a.ip("addr", "add", "10.79.0.1/24", "dev", "ta")
            self.b.ip("addr", "add", "10.79.0.9/24", "dev", "tb")
        except BaseException:
            self.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.a.delete()
        self.b.delete()

    def rx(self) -> int:
        return int(self.b.exec("cat", "/sys/class/net/tb/statistics/rx_packets"))

    # -- brokers -----------------------------------------------------------------------------

    def serve(self, *args: str) -> tuple[str, subprocess.Popen[str]]:
        self.seq += 1
        name = f"btx{os.getpid()}-{self.seq}"
        p = subprocess.Popen(self.a.cmd(PY, "-m", "pktipc", "serve", "--name", name, "-i", "ta",
                                        "--tx", "--tx-frames", "4096", *args),
                             stderr=subprocess.PIPE, text=True)
        sock = self.runtime / f"{name}.ctl"
        while not sock.exists():
            if p.poll() is not None:
                raise RuntimeError(f"broker exited: {p.stderr.read() if p.stderr else ''}")
            time.sleep(0.05)
        return name, p

    @staticmethod
    def stop(p: subprocess.Popen[str]) -> None:
        p.terminate()
        p.communicate(timeout=60)

    # -- senders: each (frames the sender says it sent, its seconds) --------------------------

    def _run(self, cmd: list[str]) -> str:
        """Runs a sender to its end: its output."""
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[0]}: {out}{err}")
        return out

    def _reaped(self, before: resource.struct_rusage) -> float:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def measure(self, variant: str, pcap: Path, loops: int) -> dict[str, Any]:
        """One sender's run: frames it sent, frames the peer received, its
        seconds, the rate received, and CPU seconds of the sender (and of
        the broker, for pktipc) per million frames."""
        before = self.rx()
        broker_cpu: float | None = None
        client_cpu = 0.0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if variant in ("raw", "raw-qdisc"):
            out = self._run(self.a.cmd(str(self.tmp / "tpacket_tx"), "ta", str(pcap), str(loops),
                                       "1" if variant == "raw" else "0"))
            f = out.split()
            sent, secs = int(f[1]), float(f[5])
        elif variant == "tcpreplay":
            out = self._run(self.a.cmd("tcpreplay", "-q", "--topspeed", "-K",
                                       "--loop", str(loops), "-i", "ta", str(pcap)))
            m = re.search(r"Actual: (\d+) packets \(\d+ bytes\) sent in ([\d.]+) seconds", out)
            assert m, out
            sent, secs = int(m[1]), float(m[2])
        else:
            name, broker = self.serve(*([] if variant == "C-qdisc" else ["--tx-qdisc-bypass"]))
            try:
                usage = resource.getrusage(resource.RUSAGE_CHILDREN)
                b0 = proc_cpu(broker.pid)
                if variant in ("C", "C-qdisc"):
                    f = self._run([str(self.tmp / "_ctxproc"), name, "bench", str(pcap),
                                   str(loops)]).split()
                    sent, secs = int(f[3]), float(f[7])
                    assert f[9] == "0", f
                elif variant == "Python":
                    f = self._run([PY, str(self.tmp / "pysender.py"), name, "bench", str(pcap),
                                   str(loops)]).split()
                    sent, secs = int(f[1]), float(f[3])
                    assert f[5] == "0", f
                else:
                    out = self._run([PY, "-m", "pktipc", "replay", "--server", name, "-i", "ta",
                                     "-r", str(pcap), "--topspeed", "--loop", str(loops)])
                    m = re.match(r"sent (\d+) frames \(\d+ bytes\) out of ta in ([\d.]+) s", out)
                    assert m, out
                    sent, secs = int(m[1]), float(m[2])
                broker_cpu = proc_cpu(broker.pid) - b0
                client_cpu = self._reaped(usage)        # before the broker is reaped too
                st = pktipc.broker_stats(name).sources[0].tx
                assert st is not None and not st.kernel_errors, st
            finally:
                self.stop(broker)
        cpu = self._reaped(usage) if broker_cpu is None else client_cpu + broker_cpu
        time.sleep(0.2)
        got = self.rx() - before
        return {"sent": sent, "received": got, "secs": secs, "pps": got / secs,
                "cpu_s_per_m": cpu / sent * 1e6}

    # -- ping --------------------------------------------------------------------------------

    def ping(self, count: int) -> dict[str, Any]:
        name, broker = self.serve("--block-timeout", "1")
        pongs = [subprocess.Popen([str(PONG), "-n", "pong-c", name, "10.79.0.2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 subprocess.Popen([PY, str(ROOT / "examples" / "pong.py"), "--name", "pong-py",
                                   name, "10.79.0.3"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        try:
            while {"pong-c", "pong-py"} - {c.name for c in pktipc.broker_stats(name).clients}:
                for p in pongs:
                    if p.poll() is not None:
                        raise RuntimeError(f"pong: {p.stderr.read() if p.stderr else ''}")
                time.sleep(0.05)
            out: dict[str, Any] = {}
            who_addr = (("kernel", "10.79.0.1"), ("pktipc-pong (C)", "10.79.0.2"),
                        ("examples/pong.py", "10.79.0.3"))
            for who, addr in who_addr + who_addr[::-1]:
                text = self.b.exec("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "5", addr,
                                   timeout=count)
                rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", text)]
                out.setdefault(who, []).extend(rtts)
                self.b.exec("ip", "neigh", "flush", "dev", "tb")
        finally:
            for p in pongs:
                p.terminate()
                p.communicate(timeout=30)
            self.stop(broker)
        res = {}
        for who, rtts in out.items():
            q = statistics.quantiles(rtts, n=100, method="inclusive")
            res[who] = {"n": len(rtts), "sent": 2 * count, "p50_ms": q[49], "p99_ms": q[98]}
        return res


VARIANTS = ["raw", "raw-qdisc", "tcpreplay", "C", "C-qdisc", "Python", "replay"]
LABELS = {"raw": "raw TPACKET_V2 TX writer, qdisc bypassed (ceiling)",
          "raw-qdisc": "raw TPACKET_V2 TX writer, through the qdisc",
          "tcpreplay": "tcpreplay --topspeed -K",
          "C": "pktipc, C client (--tx-qdisc-bypass)",
          "C-qdisc": "pktipc, C client, through the qdisc",
          "Python": "pktipc, Python client tx() (--tx-qdisc-bypass)",
          "replay": "pktipc replay --topspeed (--tx-qdisc-bypass)"}


def run(tx: TxBench, quick: bool, reps: int) -> dict[str, Any]:
    total = {64: 200_000 if quick else 1_000_000, 1400: 60_000 if quick else 300_000}
    res: dict[str, Any] = {"sizes": {}}
    for size in SIZES:
        pcap = tx.tmp / f"tx-{size}.pcap"
        write_udp_pcap(pcap, size, FILE_FRAMES[size])
        loops = total[size] // FILE_FRAMES[size]
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for rep in range(reps):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            for v in order:
                lp = max(1, loops // 4) if v == "Python" else loops
                print(f"  tx {size} B {v}", flush=True)
                runs[v].append(tx.measure(v, pcap, lp))
        res["sizes"][str(size)] = {
            "frames": total[size],
            "variants": {v: {"pps": statistics.median(r["pps"] for r in rs),
                             "spread": [min(r["pps"] for r in rs), max(r["pps"] for r in rs)],
                             "lost": sum(r["sent"] - r["received"] for r in rs),
                             "cpu_s_per_m": statistics.median(r["cpu_s_per_m"] for r in rs),
                             "runs": rs} for v, rs in runs.items()}}
        pcap.unlink()
    print("  ping", flush=True)
    res["ping"] = tx.ping(100 if quick else 500)
    return res


def ratios(res: dict[str, Any]) -> dict[str, float]:
    out = {}
    for size, s in res["sizes"].items():
        v = s["variants"]
        out[f"{size} B: C client / raw writer"] = v["C"]["pps"] / v["raw"]["pps"]
        out[f"{size} B: C client / raw writer, both through the qdisc"] = (
            v["C-qdisc"]["pps"] / v["raw-qdisc"]["pps"])
        out[f"{size} B: pktipc replay / tcpreplay"] = v["replay"]["pps"] / v["tcpreplay"]["pps"]
        out[f"{size} B: Python client / C client"] = v["Python"]["pps"] / v["C"]["pps"]
        out[f"{size} B: CPU per frame, C client and broker / raw writer"] = (
            v["C"]["cpu_s_per_m"] / v["raw"]["cpu_s_per_m"])
    p = res["ping"]
    for who in ("pktipc-pong (C)", "examples/pong.py"):
        for q in ("p50", "p99"):
            out[f"ping {q}: {who} / kernel"] = p[who][f"{q}_ms"] / p["kernel"][f"{q}_ms"]
    return out


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"{m['cpus']} CPUs, kernel {m['kernel']}; commit {m['commit'][:10]}"
             f"{' (uncommitted changes)' if m['dirty'] else ''}; {res['date']}; "
             f"{'--quick' if res['quick'] else 'full run'}, {res['reps']} repetitions", ""]
    for size, s in res["sizes"].items():
        lines += [f"**{size}-byte frames**, {s['frames']:,} a run (the Python client a quarter)",
                  "", "| sender | Mpps received (spread) | Gbit/s | not received "
                  "| CPU s / M frames |", "|---|---:|---:|---:|---:|"]
        for v, r in s["variants"].items():
            lo, hi = r["spread"]
            lines.append(f"| {LABELS[v]} | {r['pps'] / 1e6:.3f} ({lo / 1e6:.3f}–{hi / 1e6:.3f}) "
                         f"| {r['pps'] * int(size) * 8 / 1e9:.2f} | {r['lost']} "
                         f"| {r['cpu_s_per_m']:.2f} |")
        lines.append("")
    lines += ["**Ping RTT** (`ping -i 0.01` from the peer namespace)", "",
              "| replier | replies | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for who, p in res["ping"].items():
        lines.append(f"| {who} | {p['n']}/{p['sent']} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} |")
    lines.append("")
    lines += [f"- {k}: **{v:.2f}**" for k, v in ratios(res).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames, one repetition")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/tx-<date>.json)")
    ap.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.tx needs root (network namespaces, CAP_NET_RAW)", file=sys.stderr)
        return 1
    reps = a.reps or (1 if a.quick else 3)
    with tempfile.TemporaryDirectory(prefix="pktipc-btx-") as tmpdir:
        tmp = Path(tmpdir)
        runtime = tmp / "run"
        runtime.mkdir()
        os.environ["PKTIPC_RUNTIME_DIR"] = str(runtime)
        tx = TxBench(tmp, runtime)
        try:
            res = {"machine": machine(), "reps": reps, "quick": a.quick,
                   "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   **run(tx, a.quick, reps)}
        finally:
            tx.close()
    out = a.out or BENCH / "results" / f"tx-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(table(res))
    if not a.no_readme:
        refresh_readme({"tx": table(res)})
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
