"""`pktipc demo`: live on a veth pair of its own as root, from the bundled
capture without the privileges for that; every client gets every packet."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import pktipc_cmd, run_pktipc

from pktipc._tools import demo as _demo


def test_live_demo() -> None:
    r = run_pktipc("demo", "--packets", "600", "--rate", "3000", "--clients", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "captures on pktipc0, a veth in namespace" in r.stdout
    assert "the generator sent 600 frames" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines()
            if line.split()[:1] in (["ids"], ["recorder"], ["flows"])]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        ("ids", "600", "yes"), ("recorder", "600", "yes"), ("flows", "600", "yes")]
    assert "every client received every frame sent: yes" in r.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pktipc-demo" not in listed


def test_demo_falls_back_to_the_bundled_capture(tmp_path: Path) -> None:
    """Where no live capture is possible (here: no `ip` command on the PATH),
    the demo says why and serves the capture file shipped with pktipc."""
    env = dict(os.environ, PATH=str(tmp_path))
    r = subprocess.run(pktipc_cmd("demo", "--speed", "50"), capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("pktipc demo: the ip command (iproute2) is missing: serving "
                               "the bundled capture instead")
    assert "every client received every packet: yes" in r.stdout
    assert re.search(r"^ids +8000 ", r.stdout, re.M)


def test_live_demo_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _demo._live_unavailable() == ("a live capture needs root (a network namespace, "
                                         "a veth pair, CAP_NET_RAW)")
