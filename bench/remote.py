"""Remote benchmark: a capture file's packets over loopback TCP.

    .venv/bin/python -m bench.remote [--quick] [--reps R]

A synthetic capture of 64-byte or 1400-byte frames in /dev/shm, served by a
file broker (lossless), delivered over loopback TCP to one reader by:

  curve        pktipc gateway (CURVE) -> a remote Python client (pktipc.connect)
  insecure     pktipc gateway --insecure -> the same client
  pcap-over-ip pktipc pcap-over-ip -> a reader of the pcap stream
  tcpdump|nc   tcpdump -r FILE -w - | nc HOST PORT -> the same reader: what
               pcap-broker does (tcpdump -w - piped into a TCP connection)

The reader of the pcap streams reads into one buffer and counts bytes (in
Python, 4 MiB a recv: it is not what limits). Rate = packets / the time
from the reader's first bytes to the end of the stream; Gbit/s counts the
frames' bytes. CPU on the sending side = user + system seconds of the
broker and the gateway (or pcap-over-ip; or tcpdump and nc) per million
packets delivered.

Then the local clients: one C client (pktipc-count, block) of the broker,
alone, and beside a remote CURVE client (drop, so that the remote client's
pace is its own) attached through the gateway: the local client's rate.

Prints a table of medians, returns it to the suite (`make bench` writes
it into bench/README.md). Nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CBIN = ROOT / "clients" / "c" / "build" / "bin"

CLIENT = r"""
import json, sys, time, pktipc
url, name, policy, key, server_key = sys.argv[1:6]
keys = {"insecure": True} if key == "-" else {"key": key, "server_key": server_key}
n = nbytes = 0
t0 = None
with pktipc.connect(url, name, policy=policy, timeout=30, **keys) as c:
    for batch in c:
        with batch:
            if t0 is None:
                t0 = time.monotonic()
            d = batch.descriptors[batch.mine]
            n += len(d)
            nbytes += int(d["caplen"].sum())
t1 = time.monotonic()
print(json.dumps({"packets": n, "bytes": nbytes, "seconds": t1 - (t0 or t1)}))
"""


def _cpu(pid: int) -> float:
    """User + system seconds of a running process."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _reaped(p: subprocess.Popen[Any]) -> float:
    """Wait for `p`; its user + system seconds."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


def _line(p: subprocess.Popen[str], what: str) -> str:
    assert p.stderr is not None
    while True:
        line = p.stderr.readline()
        if not line:
            raise RuntimeError(f"{what}: exited before saying where it listens")
        if "listening on" in line or " on tcp://" in line:
            return line


class _Reader:
    """Reads a TCP stream to its end: bytes, and the time from the first."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes = 0
        self.seconds = 0.0
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self) -> None:
        buf = bytearray(4 << 20)
        t0 = None
        with self.sock:
            while n := self.sock.recv_into(buf):
                if t0 is None:
                    t0 = time.monotonic()
                self.bytes += n
        self.seconds = time.monotonic() - (t0 or time.monotonic())

    def join(self) -> None:
        self.t.join(timeout=600)


class Remote:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runtime = tmp / "run"
        self.runtime.mkdir(exist_ok=True)
        os.environ["PKTIPC_RUNTIME_DIR"] = str(self.runtime)
        from pktipc._net.gateway import keygen
        self.spub, self.ssec = keygen(str(tmp / "server"), "server")
        cpub, self.csec = keygen(str(tmp / "client"), "client")
        (tmp / "admitted").mkdir()
        (tmp / "admitted" / "client.key").write_text(Path(cpub).read_text())
        self.n = 0

    def _broker(self, pcap: Path, clients: int,
                speed: float | None = None) -> tuple[subprocess.Popen[str], str]:
        from bench.suite import _wait_socket
        self.n += 1
        name = f"remote{os.getpid()}-{self.n}"
        paced = ["--speed", str(speed)] if speed else []
        b = subprocess.Popen([PY, "-m", "pktipc", "serve", "--name", name, "-r", str(pcap),
                              "--wait-clients", str(clients), *paced],
                             stderr=subprocess.DEVNULL, text=True)
        _wait_socket(self.runtime, name, b)
        return b, name

    def _gateway(self, name: str, secure: bool) -> tuple[subprocess.Popen[str], str]:
        sec = (["--key", self.ssec, "--keys", str(self.tmp / "admitted")] if secure
               else ["--insecure"])
        g = subprocess.Popen([PY, "-m", "pktipc", "gateway", "--server", name, "--listen",
                              "127.0.0.1:0", *sec], stderr=subprocess.PIPE, text=True)
        where = _line(g, "gateway").split(" on tcp://")[1].split(",")[0]
        return g, where

    def _client(self, url: str, secure: bool, policy: str = "block") -> subprocess.Popen[str]:
        keys = [self.csec, self.spub] if secure else ["-", "-"]
        return subprocess.Popen([PY, "-c", CLIENT, url, "far", policy, *keys],
                                stdout=subprocess.PIPE, text=True)

    def remote(self, pcap: Path, packets: int, secure: bool) -> dict[str, Any]:
        b, name = self._broker(pcap, 1)
        g, where = self._gateway(name, secure)
        g0 = _cpu(g.pid)
        c = self._client(f"tcp://{where}/{name}", secure)
        out = json.loads(c.communicate(timeout=600)[0])
        broker_cpu = _reaped(b)
        gw_cpu = _cpu(g.pid) - g0
        g.terminate()
        g.communicate(timeout=30)
        assert out["packets"] == packets, out
        return {"pps": out["packets"] / out["seconds"],
                "gbps": out["bytes"] * 8 / out["seconds"] / 1e9,
                "cpu_per_m": (broker_cpu + gw_cpu) / packets * 1e6}

    def pcap_over_ip(self, pcap: Path, packets: int) -> dict[str, Any]:
        b, name = self._broker(pcap, 1)
        p = subprocess.Popen([PY, "-m", "pktipc", "pcap-over-ip", "--server", name,
                              "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
        port = int(_line(p, "pcap-over-ip").rsplit(":", 1)[1])
        p0 = _cpu(p.pid)
        r = _Reader(socket.create_connection(("127.0.0.1", port)))
        r.join()
        broker_cpu = _reaped(b)
        poi_cpu = _cpu(p.pid) - p0
        p.terminate()
        p.communicate(timeout=30)
        return self._stream(r, packets, pcap.stat().st_size, broker_cpu + poi_cpu)

    def tcpdump_nc(self, pcap: Path, packets: int) -> dict[str, Any]:
        lst = socket.create_server(("127.0.0.1", 0))
        port = lst.getsockname()[1]
        td = subprocess.Popen(["tcpdump", "-r", str(pcap), "-w", "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
        nc = subprocess.Popen(["nc", "-N", "127.0.0.1", str(port)], stdin=td.stdout)
        assert td.stdout is not None
        td.stdout.close()
        conn, _ = lst.accept()
        lst.close()
        r = _Reader(conn)
        r.join()
        cpu = _reaped(td) + _reaped(nc)
        return self._stream(r, packets, pcap.stat().st_size, cpu)

    @staticmethod
    def _stream(r: _Reader, packets: int, file_bytes: int, cpu: float) -> dict[str, Any]:
        """The stream is the file's size: the same header and record sizes."""
        assert r.bytes == file_bytes, (r.bytes, file_bytes)
        frames = file_bytes - 24 - 16 * packets
        return {"pps": packets / r.seconds, "gbps": frames * 8 / r.seconds / 1e9,
                "cpu_per_m": cpu / packets * 1e6}

    def local(self, pcap: Path, packets: int, with_remote: bool,
              speed: float | None = None) -> dict[str, Any]:
        """A local C client's rate (block), alone or beside a remote CURVE
        client (drop): as fast as the broker goes, or paced (`speed`, as a
        tap is by its wire), where the rate is whether it keeps up."""
        from bench.suite import _wait_clients
        b, name = self._broker(pcap, 2 if with_remote else 1, speed)
        g = c = None
        if with_remote:
            g, where = self._gateway(name, True)
            c = self._client(f"tcp://{where}/{name}", True, policy="drop")
        loc = subprocess.Popen([str(CBIN / "pktipc-count"), "-n", "near", "-p", "block",
                                "-i", "3600", name], stdout=subprocess.PIPE, text=True)
        t0 = _wait_clients(name, 2 if with_remote else 1, b)
        out = loc.communicate(timeout=600)[0]
        t1 = time.monotonic()
        got = int(out.split("total packets ")[1].split()[0])
        remote_got = 0
        if c is not None and g is not None:
            remote_got = json.loads(c.communicate(timeout=600)[0])["packets"]
            g.terminate()
            g.communicate(timeout=30)
        b.wait(timeout=60)
        assert got == packets, (got, packets)
        return {"pps": got / (t1 - t0), "remote_packets": remote_got}


# Paced replays (the captures' packets are 1 µs apart): 250,000 packets/s
# of 64 B, 100,000 of 1400 B (1.1 Gbit/s).
PACED = {64: 0.25, 1400: 0.1}


def _capture(tmp: Path, size: int, packets: int) -> Path:
    from pktipc._tools.synth import write_pcap
    path = Path("/dev/shm") / f"pktipc-remote-bench-{os.getpid()}-{size}.pcap"
    with open(path, "wb") as f:
        write_pcap(f, packets, sizes=(size,), rate_pps=1e6)
    return path


def run(quick: bool, reps: int | None = None) -> dict[str, Any]:
    reps = reps or (1 if quick else 3)
    counts = {64: 300_000, 1400: 100_000} if quick else {64: 1_000_000, 1400: 300_000}
    res: dict[str, Any] = {"reps": reps, "sizes": {}}
    subprocess.run(["make", "-s", "-C", str(ROOT / "clients" / "c"), "examples"], check=True)
    with tempfile.TemporaryDirectory(prefix="pktipc-remote-") as d:
        tmp = Path(d)
        old_env = os.environ.get("PKTIPC_RUNTIME_DIR")
        r = Remote(tmp)
        try:
            for size, n in counts.items():
                pcap = _capture(tmp, size, n)
                try:
                    runs: dict[str, list[dict[str, Any]]] = {}
                    variants: dict[str, Callable[[], dict[str, Any]]] = {
                        "curve": partial(r.remote, pcap, n, True),
                        "insecure": partial(r.remote, pcap, n, False),
                        "pcap-over-ip": partial(r.pcap_over_ip, pcap, n),
                        "tcpdump|nc": partial(r.tcpdump_nc, pcap, n),
                        "local alone": partial(r.local, pcap, n, False),
                        "local + remote": partial(r.local, pcap, n, True),
                        "paced alone": partial(r.local, pcap, n, False, PACED[size]),
                        "paced + remote": partial(r.local, pcap, n, True, PACED[size]),
                    }
                    for rep in range(reps):
                        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
                        for v in order:
                            print(f"remote: {size} B, {v}, repetition {rep + 1}", flush=True)
                            runs.setdefault(v, []).append(variants[v]())
                    res["sizes"][str(size)] = {"packets": n, "runs": runs}
                finally:
                    pcap.unlink()
        finally:
            if old_env is None:
                os.environ.pop("PKTIPC_RUNTIME_DIR", None)
            else:
                os.environ["PKTIPC_RUNTIME_DIR"] = old_env
    return res


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(x[key] for x in runs))


def table(res: dict[str, Any]) -> str:
    rows = ["| frames | delivered by | packets/s | Gbit/s | sending-side CPU s / M packets |",
            "|---:|---|---:|---:|---:|"]
    notes = []
    for size, s in res["sizes"].items():
        runs = s["runs"]
        for v in ("curve", "insecure", "pcap-over-ip", "tcpdump|nc"):
            rs = runs[v]
            rows.append(f"| {size} B | {v} | {_med(rs, 'pps') / 1e6:.3f} M | "
                        f"{_med(rs, 'gbps'):.2f} | {_med(rs, 'cpu_per_m'):.2f} |")
        base = _med(runs["tcpdump|nc"], "pps")
        curve = _med(runs["curve"], "pps")
        far = statistics.median(x["remote_packets"] for x in runs["local + remote"])
        notes.append(f"- {size} B: CURVE remote client / tcpdump|nc: "
                     f"**{curve / base:.2f}**; --insecure / tcpdump|nc: "
                     f"**{_med(runs['insecure'], 'pps') / base:.2f}**; pcap-over-ip / "
                     f"tcpdump|nc: **{_med(runs['pcap-over-ip'], 'pps') / base:.2f}**; "
                     f"CURVE / --insecure: **{curve / _med(runs['insecure'], 'pps'):.2f}**")
        for v, how in (("local", ""), ("paced", f", paced at {PACED[int(size)] * 1e6:,.0f} "
                                                 "packets/s")):
            if f"{v} alone" not in runs:
                continue
            alone = _med(runs[f"{v} alone"], "pps")
            beside = _med(runs[f"{v} + remote"], "pps")
            far = statistics.median(x["remote_packets"] for x in runs[f"{v} + remote"])
            notes.append(f"- {size} B{how}: a local C client's rate beside a remote CURVE "
                         f"client (drop) / alone: **{beside / alone:.2f}** ({beside / 1e6:.3f} M "
                         f"against {alone / 1e6:.3f} M packets/s; the remote client got "
                         f"{far:,.0f} of {s['packets']:,})")
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + f"\n\n{res['reps']} repetitions, medians"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    a = ap.parse_args(argv)
    res = run(a.quick, a.reps)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"remote-{stamp}.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
