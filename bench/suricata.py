"""Suricata, three ways to feed it, on one veth pair: through pktipc's capture
plugin (clients/suricata/), through Suricata's own AF_PACKET capture
(cluster_flow), and reading the pcap stream `pktipc dump -w FIFO` writes;
each alone, then with a second analyzer beside it (pktipc: a `pktipc-count`
client; AF_PACKET: a second TPACKET_V3 reader, bench/baselines/tpacket_read.c).

    .venv/bin/python -m bench.suricata [--quick] [--no-readme]

Same generator (bench/baselines/gen.c, 64-byte UDP frames over 256 flows),
same ruleset, Suricata with 2 worker threads (workers run mode; `-r` on the
FIFO: autofp, one reader and 2 workers). For each, the offered rate climbs a
ladder; at each step a fresh Suricata gets COUNT frames, and what it decoded
(its own decoder.pkts at exit) is compared with what was sent. The drop-free
rate is the highest step at which it decoded every frame. CPU: user + system
seconds of every process of the set-up (Suricata, the broker, `pktipc dump`,
the second analyzer) and the kernel's interrupt and softirq time, less what
the generator alone costs, per packet Suricata decoded, at the lowest step
(which all of them take without loss). Needs root, gcc and Suricata with the
plugin built (make test does both). Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pktipc
from bench.live import CCOUNT, PY, SETTLE, Bench, run_alone
from bench.offline import ROOT

PLUGIN = ROOT / "clients" / "suricata" / "build" / "pktipc.so"
SIZE = 64

YAML = """%YAML 1.1
---
default-rule-path: {dir}
rule-files: [bench.rules]
outputs:
  - eve-log:
      enabled: yes
      filename: eve.json
      types: [stats: {{totals: yes, threads: no}}]
stats:
  enabled: yes
  interval: 1
af-packet:
  - interface: va
    threads: 2
    block-size: 1048576
    ring-size: 32768
    cluster-id: 99
    cluster-type: cluster_flow
    defrag: yes
    tpacket-v3: yes
logging:
  default-log-level: notice
  outputs:
    - console: {{enabled: yes}}
"""

RULES = """
alert udp any any -> any any (msg:"marker"; content:"PKTIPC-MARK"; sid:1;)
alert udp any any -> any 1234 (msg:"to 1234, more than 32 bytes"; dsize:>32; sid:2;)
alert ip any any -> any any (msg:"TTL below 2"; ttl:<2; sid:3;)
alert udp any any -> any any (msg:"zero run"; content:"|00 00 00 00 00 00 00 00|"; offset:4; sid:4;)
"""

SETUPS = {
    "plugin": "Suricata through the pktipc plugin",
    "afpacket": "Suricata AF_PACKET (cluster_flow)",
    "fifo": "Suricata -r on `pktipc dump -w FIFO`",
}


class SuricataBench:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.n = 0

    def _suricata(self, d: Path, args: list[str], netns: bool = False) -> subprocess.Popen[bytes]:
        cmd = ["suricata", "-c", str(d / "suricata.yaml"), "-l", str(d), "-k", "none", *args]
        out = open(d / "console.txt", "w")
        p = subprocess.Popen(self.b.nsx(*cmd) if netns else cmd, stdout=out,
                             stderr=subprocess.STDOUT)
        out.close()
        return p

    def _wait_started(self, d: Path, p: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        while "Engine started" not in (d / "console.txt").read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((d / "console.txt").read_text())
            time.sleep(0.05)

    def _broker(self, name: str) -> subprocess.Popen[str]:
        broker = subprocess.Popen(self.b.nsx(PY, "-m", "pktipc", "serve", "--name", name,
                                             "-i", "va"), stderr=subprocess.PIPE, text=True)
        sock = self.b.runtime / f"{name}.ctl"
        while not sock.exists():
            if broker.poll() is not None:
                raise RuntimeError(broker.stderr.read() if broker.stderr else "broker")
            time.sleep(0.02)
        return broker

    def run(self, setup: str, second: bool, count: int, rate: float) -> dict[str, Any]:
        self.n += 1
        d = self.b.tmp / f"suricata-{self.n}"
        d.mkdir()
        (d / "suricata.yaml").write_text(YAML.format(dir=d))
        (d / "bench.rules").write_text(RULES)
        name = f"sbench{os.getpid()}-{self.n}"
        procs: list[subprocess.Popen[Any]] = []
        broker = None
        if setup != "afpacket":
            broker = self._broker(name)
            procs.append(broker)
        if setup == "plugin":
            s = self._suricata(d, ["--set", f"plugins.0={PLUGIN}", "--capture-plugin=pktipc",
                                   f"--capture-plugin-args=server={name},threads=2",
                                   "--runmode", "workers"])
        elif setup == "afpacket":
            s = self._suricata(d, ["--af-packet=va", "--runmode", "workers"], netns=True)
        else:
            fifo = d / "stream.pcap"
            os.mkfifo(fifo)
            dump = subprocess.Popen([PY, "-m", "pktipc", "dump", "--server", name, "--client",
                                     "fifo", "-w", str(fifo)], stderr=subprocess.DEVNULL)
            procs.append(dump)
            s = self._suricata(d, ["-r", str(fifo), "--runmode", "autofp",
                                   "--set", "threading.detect-thread-ratio=1"])
        procs.append(s)
        try:
            return self._measure(d, setup, second, count, rate, name, procs, s, broker)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            # A broker killed above cannot remove its segment and socket.
            for f in Path("/dev/shm").glob(f"pktipc.{name}.*"):
                f.unlink()
            for f in (self.b.runtime / f"{name}.ctl", self.b.runtime / f"{name}.lock"):
                f.unlink(missing_ok=True)

    def _measure(self, d: Path, setup: str, second: bool, count: int, rate: float, name: str,
                 procs: list[subprocess.Popen[Any]], s: subprocess.Popen[bytes],
                 broker: subprocess.Popen[str] | None) -> dict[str, Any]:
        warm = 0
        if setup == "fifo":
            # `pktipc dump` opens the FIFO at its first packet, and -r waits for that.
            while not pktipc.broker_stats(name).clients:
                time.sleep(0.02)
            warm = self.b.generate(1, SIZE)["sent"]
        self._wait_started(d, s)
        other = None
        if second and setup == "afpacket":
            other = subprocess.Popen(self.b.nsx(str(self.b.tmp / "tpacket_read"), "va",
                                                str(1 << 20), "32", "10"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert other.stderr is not None
            assert other.stderr.readline().strip() == "ready"
        elif second:
            other = subprocess.Popen([str(CCOUNT), "-n", "second", "-i", "3600", name],
                                     stdout=subprocess.PIPE, text=True)
        if other is not None:
            procs.append(other)
        if broker is not None:
            want = {"plugin": 2, "fifo": 1}[setup] + (1 if second else 0)
            while sum(c.attached for c in pktipc.broker_stats(name).clients) < want:
                time.sleep(0.02)
        time.sleep(0.3)
        g = self.b.generate(count, SIZE, rate, tuple(p.pid for p in procs))
        time.sleep(SETTLE)
        second_got = None
        if other is not None:
            other.send_signal(signal.SIGINT if setup != "afpacket" else signal.SIGTERM)
            out, _ = other.communicate(timeout=30)
            second_got = (int(out.split("total packets ")[1].split()[0]) if setup != "afpacket"
                          else int(dict(zip(out.split()[::2], out.split()[1::2],
                                            strict=True))["packets"]))
        if setup == "fifo":
            assert broker is not None
            broker.send_signal(signal.SIGTERM)      # end of stream: dump ends, and -r with it
            s.wait(timeout=120)
        else:
            s.send_signal(signal.SIGTERM)
            s.wait(timeout=120)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        stats = [json.loads(x) for x in (d / "eve.json").read_text().splitlines()
                 if '"event_type":"stats"' in x][-1]["stats"]
        return {**g, "setup": setup, "second": second, "rate": rate,
                "decoded": stats["decoder"]["pkts"] - warm, "second_got": second_got}


def run(bench: Bench, quick: bool) -> dict[str, Any]:
    sb = SuricataBench(bench)
    ladder = [100_000, 200_000, 400_000, 600_000, 800_000, 1_000_000, 1_200_000, 0]
    secs = 1.0 if quick else 2.0
    gen_only = {r: bench.generate(int(r * secs), SIZE, r) for r in ladder[:1]}
    rows = []
    for second in (False, True):
        for setup in SETUPS:
            for rate in ladder:
                r = sb.run(setup, second, int((rate or 1_500_000) * secs), rate)
                r["lossless"] = r["decoded"] == r["sent"] and (
                    r["second_got"] is None or r["second_got"] == r["sent"])
                rows.append(r)
                print(f"  suricata {setup}{' + second' if second else ''} {rate}/s: sent "
                      f"{r['sent']}, decoded {r['decoded']}, second {r['second_got']}",
                      flush=True)
                if r["decoded"] < r["sent"]:
                    break
    summary = []
    base = ladder[0]
    g = gen_only[base]
    for second in (False, True):
        for setup in SETUPS:
            rs = [r for r in rows if (r["setup"], r["second"]) == (setup, second)]
            ok = [r["sent"] / r["gen_s"] for r in rs if r["decoded"] == r["sent"]]
            first = [r for r in rs if r["rate"] == base][0]
            cpu = (first["consumer_cpu_s"] + first["kernel_cpu_s"] + first["gen_cpu_s"]
                   - (g["kernel_cpu_s"] + g["gen_cpu_s"]) * first["sent"] / g["sent"])
            summary.append({"setup": setup, "second": second,
                            "drop_free_pps": int(max(ok)) if ok else 0,
                            "lossless_at_max": bool(rs) and rs[-1]["rate"] == 0
                            and rs[-1]["decoded"] == rs[-1]["sent"],
                            "cpu_us_per_pkt": cpu / max(first["decoded"], 1) * 1e6,
                            "at_pps": base})
    return {"rows": rows, "summary": summary, "ladder": ladder, "seconds_per_step": secs}


def table(res: dict[str, Any]) -> str:
    summary: list[dict[str, Any]] = res["summary"]

    def get(setup: str, second: bool) -> dict[str, Any]:
        return [x for x in summary if (x["setup"], x["second"]) == (setup, second)][0]

    lines = ["| set-up | beside it | drop-free rate, k frames/s | CPU µs per packet "
             f"(at {res['summary'][0]['at_pps'] // 1000} k/s) |", "|---|---|---:|---:|"]
    for second in (False, True):
        for setup, label in SETUPS.items():
            x = get(setup, second)
            beside = ("—" if not second else "a second TPACKET_V3 reader"
                      if setup == "afpacket" else "a `pktipc-count` client")
            top = " (the generator's top rate)" if x["lossless_at_max"] else ""
            lines.append(f"| {label} | {beside} | {x['drop_free_pps'] // 1000}{top} | "
                         f"{x['cpu_us_per_pkt']:.2f} |")
    p, a, f = get("plugin", False), get("afpacket", False), get("fifo", False)
    p2, a2 = get("plugin", True), get("afpacket", True)
    lines += ["",
              f"- plugin / AF_PACKET, drop-free rate alone: "
              f"**{p['drop_free_pps'] / max(a['drop_free_pps'], 1):.2f}**",
              f"- plugin + `pktipc-count` / AF_PACKET + second reader, CPU per packet: "
              f"**{p2['cpu_us_per_pkt'] / a2['cpu_us_per_pkt']:.2f}**",
              f"- plugin / FIFO, drop-free rate alone: "
              f"**{p['drop_free_pps'] / max(f['drop_free_pps'], 1):.2f}**"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per step instead of 2")
    ap.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    a = ap.parse_args(argv)

    def build_and_run(bench: Bench) -> dict[str, Any]:
        subprocess.run(["make", "-s", "-C", str(ROOT / "clients" / "c"), "examples"], check=True)
        subprocess.run(["make", "-s", "-C", str(ROOT / "clients" / "suricata")], check=True)
        return run(bench, a.quick)

    return run_alone("suricata", "suricata", build_and_run, table, readme=not a.no_readme)


if __name__ == "__main__":
    sys.exit(main())
