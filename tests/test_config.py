"""serve --config FILE: every option of serve is a key, round-trips through
--print-config, and loses to the command line; a bad file is one line."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import PCAPS, run_pktipc

import pktipc
from pktipc._tools import cli as _cli
from pktipc._tools import config as _config

SERVE = _config.subparser(_cli._parser(), "serve")

# Every key with a value other than its default; interfaces and files (and
# the filter given two ways) exclude each other, and so do AF_XDP and
# TPACKET_V3's own keys, so three files cover them.
LIVE = """\
name = "tap"
interfaces = ["eth1", "eth2"]
filter = "not port 22"
snaplen = 128
promisc = false
vlan-reinsert = false
hw-timestamps = true
block-size = "2M"
blocks = 16
block-timeout = 2
fanout = 7
fanout-mode = "cpu"
user = "pktipc"
allow-group = "ids"
max-clients = 100
max-recordings = 2
heartbeat = 0.5
liveness = 10
grace = 5.5
tunnel-hash = true
lease = 0
wait-clients = 2
linger = true
slab-size = 4194304
slabs = 128
credit = 16
allow-block = ["rec", "user:pktipc"]
evict-backoff = 3
max-connections = 200
control-rate = 500
tx = ["eth1"]
allow-tx = ["ids"]
tx-frames = 4096
tx-qdisc-bypass = true
"""
FILES = """\
files = ["a.pcap", "b.pcapng"]
expression = ["tcp", "and", "port", "80"]
speed = 2.5
loop = 0
"""
XDP = """\
name = "xtap"
interfaces = ["eth1"]
xdp = true
queues = "0,1"
xdp-mode = "skb"
zero-copy = true
frames = 4096
"""
# What --print-config says for them: sizes in bytes, ids as the command line keeps them.
NORMAL = {"block-size": 2 << 20, "fanout": "7", "liveness": 10.0}


def _write(tmp: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _printed(*args: str) -> dict[str, Any]:
    r = run_pktipc("serve", *args, "--print-config")
    assert r.returncode == 0 and not r.stderr, r.stderr
    return tomllib.loads(r.stdout)


def test_the_keys_are_serves_options() -> None:
    dests = {a.dest for a in SERVE._actions} - {"help", "config", "print_config"}
    assert {k.dest for k in _config.keys(SERVE).values()} == dests
    given = tomllib.loads(LIVE) | tomllib.loads(FILES) | tomllib.loads(XDP)
    assert set(given) == set(_config.keys(SERVE)), "a serve option missing from the samples"


@pytest.mark.parametrize("text", [LIVE, FILES, XDP], ids=["interfaces", "files", "xdp"])
def test_every_key_round_trips(tmp_path: Path, text: str) -> None:
    given = tomllib.loads(text)
    printed = _printed("--config", str(_write(tmp_path, text)))
    for key, v in given.items():
        assert printed[key] == NORMAL.get(key, v), key
    # What it printed reads back as itself.
    again = _write(tmp_path, run_pktipc("serve", "--config", str(_write(tmp_path, text)),
                                        "--print-config").stdout, "printed.toml")
    assert _printed("--config", str(again)) == printed
    r1 = run_pktipc("serve", "--config", str(again), "--print-config")
    assert r1.stdout == again.read_text()


def test_defaults_print_and_unset_options_are_comments() -> None:
    r = run_pktipc("serve", "-r", "x.pcap", "--print-config")
    assert r.returncode == 0
    assert "\n# user =\n" in r.stdout and "\n# wait-clients =\n" in r.stdout
    assert tomllib.loads(r.stdout)["credit"] == 8


def test_the_command_line_wins(tmp_path: Path) -> None:
    cfg = str(_write(tmp_path, FILES + "credit = 16\nname = 'fromfile'\n"))
    p = _printed("--config", cfg, "--credit", "8", "--name", "cli")
    assert p["credit"] == 8 and p["name"] == "cli" and p["loop"] == 0
    # -i on the command line replaces the file's files (they exclude each other).
    p = _printed("--config", cfg, "-i", "eth9")
    assert p["interfaces"] == ["eth9"] and "files" not in p
    # Lists are replaced, not extended.
    assert _printed("--config", cfg, "-r", "c.pcap")["files"] == ["c.pcap"]
    # --realtime sets speed, over the file's.
    assert _printed("--config", cfg, "--realtime")["speed"] == 1.0


@pytest.mark.parametrize(("text", "says"), [
    ("blocksize = 3\n", "unknown key 'blocksize' (did you mean 'block-size'?"),
    ("[serve]\ncredit = 3\n", "unknown key 'serve'"),
    ("credit = 'x'\n", "credit = \"x\": credit takes an integer"),
    ("credit = 1.5\n", "credit = 1.5: credit takes an integer"),
    ("credit = true\n", "credit = true: credit takes an integer"),
    ("heartbeat = 'soon'\n", "heartbeat takes a number"),
    ("promisc = 'no'\n", "promisc = \"no\": promisc takes true or false"),
    ("fanout-mode = 'x'\n", "fanout-mode takes one of cpu, hash, lb, qm, rnd"),
    ("interfaces = 'eth1'\n", "interfaces takes a list, each a string"),
    ("files = ['a', [2]]\n", "files = [\"a\", [2]]: files takes a list, each a string"),
    ("block-size = '1Q'\n", "block-size takes what --block-size takes (BYTES)"),
    ("interfaces = ['a']\nfiles = ['b']\n", "files and interfaces: give one of them"),
    ("credit = \n", "not TOML: Invalid value (at line 2, column 10)"),
])
def test_a_bad_file_is_one_line(tmp_path: Path, text: str, says: str) -> None:
    cfg = _write(tmp_path, "slabs = 8\n" + text if not text.startswith("[") else text)
    r = run_pktipc("serve", "--config", str(cfg))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"pktipc: error: {cfg}: ") and says in r.stderr, r.stderr


def test_a_missing_file_and_a_missing_source(tmp_path: Path) -> None:
    r = run_pktipc("serve", "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and r.stderr == \
        f"pktipc: error: {tmp_path / 'none.toml'}: No such file or directory\n"
    r = run_pktipc("serve", "--config", str(_write(tmp_path, "credit = 4\n")))
    assert r.returncode == 2 and "one of the arguments -i -r is required (here or in" in r.stderr
    r = run_pktipc("serve")
    assert r.returncode == 2 and "one of the arguments -i -r is required" in r.stderr


def test_an_option_added_later_is_a_key(tmp_path: Path) -> None:
    p = _cli._parser()
    serve = _config.subparser(p, "serve")
    serve.add_argument("--new-thing", type=int, choices=(1, 2))
    serve.add_argument("--ports", type=int, action="append")
    cfg = _write(tmp_path, "new-thing = 2\nports = [80, 443]\n")
    assert _config.load(str(cfg), serve) == {"new_thing": 2, "ports": [80, 443]}
    with pytest.raises(ValueError, match="new-thing takes one of 1, 2"):
        _config.load(str(_write(tmp_path, "new-thing = 3\n", "bad.toml")), serve)
    with pytest.raises(ValueError, match="ports takes a list, each an integer"):
        _config.load(str(_write(tmp_path, "ports = [80, 'x']\n", "bad.toml")), serve)

    def parser() -> argparse.ArgumentParser:
        return p

    a = _config.parse(parser, ["serve", "-r", "x", "--config", str(cfg), "--new-thing", "1"])
    assert a.new_thing == 1 and a.ports == [80, 443]


def test_a_broker_from_a_config_file(broker, tmp_path: Path) -> None:
    pcap = PCAPS / "dns_udp.pcap"
    cfg = _write(tmp_path, f"files = ['{pcap}']\nslab-size = '64k'\nslabs = 4\nlinger = true\n")
    b = broker("--config", str(cfg))
    assert pktipc.broker_stats(b.name).slabs == pktipc.SlabStats(size=65536, count=4, free=4)
    with pktipc.connect(b.name, "c") as c:
        got = sum(len(batch) for batch in c)
    assert got == pktipc.broker_stats(b.name).counters.packets > 0
