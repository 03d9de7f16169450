"""Who may use a broker: its own user by default, a Unix group with --allow-group.

The other user is `nobody`; what it tries is what any client must do, in a
small C program (so nothing it needs lives in this checkout): connect to the
control socket and map the segment read-only."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PCAPS, BrokerProc

import pktipc

DNS = PCAPS / "dns_udp.pcap"
NOBODY = 65534

PROBE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof(a.sun_path) - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    printf("connect %s\n", connect(s, (struct sockaddr *)&a, sizeof(a)) == 0 ? "ok" : "denied");
    int fd = shm_open(argv[2], O_RDONLY, 0);
    struct stat st;
    void *p = fd >= 0 && fstat(fd, &st) == 0
              ? mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    printf("map %s\n", p != MAP_FAILED ? "ok" : "denied");
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = Path(tempfile.mkdtemp(prefix="pktipc-probe-"))
    exe = d / "probe"
    src = tmp_path_factory.mktemp("probe") / "probe.c"
    src.write_text(PROBE)
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)
    os.chmod(d, 0o755)
    yield exe
    exe.unlink()
    d.rmdir()


@pytest.fixture
def shared_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime directory other users could reach, were it not for its mode."""
    top = Path(tempfile.mkdtemp(prefix="pktipc-rt-"))
    os.chmod(top, 0o711)
    run = top / "run"
    monkeypatch.setenv("PKTIPC_RUNTIME_DIR", str(run))
    yield run
    for p in run.glob("*"):
        p.unlink()
    if run.exists():
        run.rmdir()
    top.rmdir()


def as_nobody(probe: Path, b: BrokerProc) -> list[str]:
    shm = "/" + next(Path("/dev/shm").glob(f"pktipc.{b.name}.*")).name
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        str(probe), str(b.socket), shm], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\n")[:2]


def serve(name: str, run: Path, *args: str) -> BrokerProc:
    b = BrokerProc(name, ["-r", str(DNS), "--wait-clients", "2", *args], run)
    b.wait_ready()
    return b


def test_default_admits_only_the_owner(probe: Path, shared_runtime: Path) -> None:
    b = serve(f"perm{os.getpid()}", shared_runtime)
    try:
        assert stat.S_IMODE(shared_runtime.stat().st_mode) == 0o750
        assert stat.S_IMODE(b.socket.stat().st_mode) == 0o600
        seg = next(Path("/dev/shm").glob(f"pktipc.{b.name}.*"))
        assert stat.S_IMODE(seg.stat().st_mode) == 0o600
        assert as_nobody(probe, b) == ["connect denied", "map denied"]
        with pktipc.connect(b.name, "owner"):     # the owner is admitted
            pass
    finally:
        b.stop()


def test_group_is_admitted(probe: Path, shared_runtime: Path) -> None:
    b = serve(f"permg{os.getpid()}", shared_runtime, "--allow-group", "nogroup")
    try:
        assert shared_runtime.stat().st_gid == NOBODY
        assert (b.socket.stat().st_gid, stat.S_IMODE(b.socket.stat().st_mode)) == \
            (NOBODY, 0o660)
        seg = next(Path("/dev/shm").glob(f"pktipc.{b.name}.*"))
        assert (seg.stat().st_gid, stat.S_IMODE(seg.stat().st_mode)) == (NOBODY, 0o640)
        assert as_nobody(probe, b) == ["connect ok", "map ok"]
    finally:
        b.stop()


def test_denied_is_said_plainly(shared_runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user without access is told (root passes every access check, so
    the check is made to fail as it would for that user)."""
    b = serve(f"permd{os.getpid()}", shared_runtime)
    try:
        monkeypatch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(pktipc.PermissionDenied, match="serve --allow-group"):
            pktipc.connect(b.name, "c")
    finally:
        b.stop()


def test_unknown_group_is_refused() -> None:
    from conftest import run_pktipc

    r = run_pktipc("serve", "--name", "x10", "-r", str(DNS), "--allow-group", "no-such-group-x")
    assert r.returncode == 1
    assert r.stderr.strip() == "pktipc: error: --allow-group no-such-group-x: no such group"
