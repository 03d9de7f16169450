"""The systemd units (systemd-analyze verify and security), readiness over
a notify socket the test listens on (systemd is not PID 1 here), and the
log levels journald reads off stderr."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PCAPS, ROOT, pktipc_cmd, segments
from opshelp import Procs, wait_for

import pktipc
from pktipc._broker import service as _service
from pktipc._tools import cli as _cli
from pktipc._tools import config as _config

UNITS = ROOT / "systemd"
BINDIR = Path(sys.executable).parent       # where `pip install` put the pktipc script


def _render(tmp: Path, unit: str, instance: str | None = None) -> Path:
    """The unit as make install-service writes it; an instance is a link to a template."""
    text = (UNITS / f"{unit}.in").read_text().replace("@BINDIR@", str(BINDIR))
    (tmp / unit).write_text(text)
    if instance is None:
        return tmp / unit
    (tmp / instance).symlink_to(unit)
    return tmp / instance


@pytest.mark.parametrize(("unit", "instance"), [("pktipc@.service", "pktipc@tap.service"),
                                                ("pktipc-exporter.service", None)])
def test_units_pass_systemd_analyze(tmp_path: Path, unit: str, instance: str | None) -> None:
    assert (BINDIR / "pktipc").exists()
    path = _render(tmp_path, unit, instance)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                       capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", r.stdout)
    assert score, r.stdout + r.stderr
    assert float(score[1]) <= 3.0, r.stdout      # the tool's scale: 0 safest, 10 exposed


def test_the_broker_unit_is_hardened_as_documented() -> None:
    text = (UNITS / "pktipc@.service.in").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure"
    assert settings["ExecStart"] == \
        "@BINDIR@/pktipc serve --config /etc/pktipc/%i.toml --name %i"
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert settings[key] == "CAP_NET_RAW CAP_NET_ADMIN"
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["RuntimeDirectory"] == "pktipc" and settings["User"] == "pktipc"
    # Brokers share /run/pktipc and their user: neither may go with one of them.
    assert settings["RuntimeDirectoryPreserve"] == "yes" and "RemoveIPC" not in settings
    assert settings["Environment"] == "PKTIPC_RUNTIME_DIR=/run/pktipc"


def test_the_example_configuration_is_valid() -> None:
    serve = _config.subparser(_cli._parser(), "serve")
    assert _config.load(str(UNITS / "example.toml"), serve)["interfaces"] == ["eth1"]


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_once_socket_and_segment_exist(broker, tmp_path: Path, runtime_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:
            name = f"pktipc-test-{os.getpid()}-{tmp_path.name}"
            listener.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            listener.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        listener.settimeout(15)
        b = broker("-r", str(PCAPS / "dns_udp.pcap"), ready=False)
        msg = listener.recv(4096).decode()
        # At READY=1 clients can attach: the socket is bound, the segment made.
        assert b.socket.exists() and segments(b.name)
        assert msg.splitlines() == ["READY=1", f"STATUS=serving clients on ipc://{b.socket}"]
        st = pktipc.broker_stats(b.name)
        assert st.state == "running"


def test_no_ready_when_the_start_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        r = subprocess.run(pktipc_cmd("serve", "-r", str(tmp_path / "none.pcap")),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.recv(4096)


def test_a_notify_socket_that_is_gone_is_logged(broker, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--wait-clients", "0", ready=False)
    assert b.wait() == 0
    assert "cannot tell the service manager that the broker is ready" in b.stderr()


def test_notify_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert _service.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:9")
    assert _service.notify("READY=1") is False


def test_log_lines_carry_levels_for_journald(procs: Procs, runtime_dir: Path,
                                             tmp_path: Path) -> None:
    """With stderr on the journal ($JOURNAL_STREAM names it), every line of the
    broker starts with its sd-daemon level; elsewhere nothing changes."""
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    name = f"j{os.getpid()}"
    b = procs.start(pktipc_cmd("serve", "--name", name, "-r", str(PCAPS / "dns_udp.pcap"),
                               "--loop", "0"),
                    stderr=w, env=env)
    os.close(w)
    wait_for("the broker", (runtime_dir / f"{name}.ctl").exists)
    victim = procs.start([sys.executable, "-c", "import pktipc, os, sys\n"
                          "c = pktipc.connect(sys.argv[1], 'victim')\n"
                          "print('attached', flush=True)\nsys.stdin.read()\n", name],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert victim.stdout is not None and victim.stdout.readline() == "attached\n"
    victim.kill()
    victim.wait()
    wait_for("the broker to see its client die",
             lambda: not pktipc.broker_stats(name).clients)
    b.send_signal(signal.SIGTERM)
    assert b.wait(timeout=20) == 0
    with os.fdopen(r) as f:
        lines = f.read().splitlines()
    assert lines == [
        f"<6>pktipc: serving {PCAPS / 'dns_udp.pcap'} as '{name}' on "
        f"ipc://{runtime_dir / name}.ctl, waiting for 1 client(s)",
        "<4>pktipc: client 'victim' dropped: its process exited",
        "<5>pktipc: stopped",
    ]
    assert segments(name) == []
    # Not on the journal: the lines as they were.
    r2 = subprocess.run(pktipc_cmd("serve", "-r", str(tmp_path / "none.pcap")),
                        capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, JOURNAL_STREAM="1:2"))
    assert r2.stderr.startswith("pktipc: error: ")
    # A start that fails: its one line is an error.
    r, w = os.pipe()
    st = os.fstat(w)
    subprocess.run(pktipc_cmd("serve", "-r", str(tmp_path / "none.pcap")), stderr=w,
                   timeout=60, env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read() == f"<3>{r2.stderr}"

def test_level_table() -> None:
    assert [_service.level(line) for line in (
        "pktipc: error: x", "pktipc: cleanup: y", "pktipc: client 'a' dropped: b",
        "pktipc: eth1: the interface went down", "pktipc: stopped",
        "pktipc: capturing on eth1 as 'tap' on ipc://x")] == [3, 3, 4, 4, 5, 6]
