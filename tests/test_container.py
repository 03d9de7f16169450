"""A client in a container: its own mount and pid namespaces (unshare), with
the host's runtime directory and /dev/shm bound in, or without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import PCAPS, ROOT
from pcapref import read_pcap

CAPTURE = PCAPS / "dns_udp.pcap"

# A fresh /dev/shm and an empty runtime directory, as a container has; the
# host's are kept at $STAGE first, and bound back in when asked.
CONTAINER = """
set -e
mount --bind /dev/shm "$STAGE/shm"
mount --bind "$RUNDIR" "$STAGE/run"
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs "$RUNDIR"
case " $BIND " in *" run "*) mount --bind "$STAGE/run" "$RUNDIR";; esac
case " $BIND " in *" shm "*) mount --bind "$STAGE/shm" /dev/shm;; esac
echo "pid $$"
exec "$@"
"""


def _in_container(tmp: Path, runtime: Path, bind: str,
                  *cmd: str) -> subprocess.CompletedProcess[str]:
    stage = tmp / f"stage-{bind.replace(' ', '-') or 'none'}"
    for d in ("shm", "run"):
        (stage / d).mkdir(parents=True)
    env = {"STAGE": str(stage), "RUNDIR": str(runtime), "BIND": bind,
           "PKTIPC_RUNTIME_DIR": str(runtime), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                           "sh", "-c", CONTAINER, "container", *cmd],
                          capture_output=True, text=True, timeout=60, env=env)


def test_a_client_in_a_container(broker, tmp_path: Path, runtime_dir: Path) -> None:
    b = broker("-r", str(CAPTURE), "--linger")
    out = tmp_path / "got.pcap"
    dump = (sys.executable, "-m", "pktipc", "dump", "--server", b.name, "-w", str(out))

    # Bound in: every packet, read by a process that is pid 1 of its namespace.
    r = _in_container(tmp_path, runtime_dir, "run shm", *dump, "--client", "boxed")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "pid 1\n"
    assert read_pcap(str(out)).packets == read_pcap(str(CAPTURE)).packets

    # Without the runtime directory: what to mount.
    r = _in_container(tmp_path, runtime_dir, "shm", *dump, "--client", "c2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"broker '{b.name}' is not running" in r.stderr
    assert f"if this runs in a container, mount the host's {runtime_dir} and /dev/shm " \
           "into it" in r.stderr

    # Without /dev/shm: the broker answers, its segment is not there.
    r = _in_container(tmp_path, runtime_dir, "run", *dump, "--client", "c3")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "is not in this process's /dev/shm" in r.stderr
    assert "needs the host's /dev/shm mounted in" in r.stderr
