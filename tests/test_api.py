"""The public surface: what `import pktipc` offers, and the error taxonomy."""

import pytest
from pktipc._shm import lib

import pktipc
import pktipc.aio
from pktipc._errors import refusal


def test_all_is_pinned() -> None:
    assert sorted(pktipc.__all__) == sorted([
        "PKT_DTYPE", "Batch", "BrokerCounters", "BrokerGone", "BrokerNotRunning", "BrokerStats",
        "Busy", "Client", "ClientCounters", "ClientStats", "ClosedError", "ControlStats",
        "Direction", "EndOfStream", "FilterError", "Flags", "GroupStats", "Iface", "LayoutError",
        "NameTaken", "Packet", "PermissionDenied", "PktipcError", "Refused", "SlabStats",
        "SourceError", "SourceStats", "Tx", "UntrustedBroker", "broker_stats", "brokers",
        "connect",
    ])
    assert sorted(pktipc.aio.__all__) == ["AsyncClient", "connect"]
    for mod in (pktipc, pktipc.aio):
        for name in mod.__all__:
            assert getattr(mod, name) is not None


def test_flags_are_the_c_constants() -> None:
    """Every PKTIPC_F_* bit of shm/pktipc_layout.h is a member of pktipc.Flags,
    under its name, and every PKTIPC_DIR_* value one of pktipc.Direction."""
    bits = {n[len("PKTIPC_F_"):]: getattr(lib, n) for n in dir(lib)
            if n.startswith("PKTIPC_F_") and n != "PKTIPC_F_DIR_SHIFT"}
    assert {n: f.value for n, f in pktipc.Flags.__members__.items()} == bits
    dirs = {n[len("PKTIPC_DIR_"):]: getattr(lib, n) for n in dir(lib)
            if n.startswith("PKTIPC_DIR_")}
    assert {d.name: d.value for d in pktipc.Direction} == dirs
    f = pktipc.Flags(lib.PKTIPC_F_TRUNCATED | lib.PKTIPC_DIR_MULTICAST << lib.PKTIPC_F_DIR_SHIFT)
    assert f & pktipc.Flags.TRUNCATED and not f & pktipc.Flags.VLAN_VALID
    assert f.direction is pktipc.Direction.MULTICAST
    assert pktipc.Flags(0).direction is pktipc.Direction.UNKNOWN


def test_errors_share_one_base() -> None:
    for cls in (pktipc.BrokerGone, pktipc.BrokerNotRunning, pktipc.ClosedError,
                pktipc.PermissionDenied,
                pktipc.LayoutError, pktipc.NameTaken, pktipc.Refused, pktipc.SourceError,
                pktipc.UntrustedBroker):
        assert issubclass(cls, pktipc.PktipcError)
    # The end of a capture is not a failure: catching errors must not swallow it.
    assert not issubclass(pktipc.EndOfStream, pktipc.PktipcError)


@pytest.mark.parametrize(("code", "cls"), [("name-taken", pktipc.NameTaken),
                                           ("too-many-clients", pktipc.Refused),
                                           ("bad-release", pktipc.Refused),
                                           ("balance-mismatch", pktipc.Refused),
                                           ("group-mismatch", pktipc.Refused)])
def test_refusal_maps_every_code(code: str, cls: type) -> None:
    e = refusal(code, "why")
    assert type(e) is cls and e.code == code and str(e) == "why"


def test_bad_names_are_refused_before_any_io() -> None:
    for bad in ("", "a/b", "ids\n", "-x", "x" * 49):
        with pytest.raises(ValueError):
            pktipc.connect("broker", bad)
        with pytest.raises(ValueError):
            pktipc.connect(bad, "client")
        with pytest.raises(ValueError):
            pktipc.connect("broker", "client", group=bad)
    with pytest.raises(ValueError, match="balance"):
        pktipc.connect("broker", "client", balance="hash")


def test_status_json_has_the_fields_of_the_types(broker) -> None:
    """`pktipc status --json` prints each broker's STATS reply as it is: the
    keys are BrokerStats' fields and those of the types it holds."""
    import dataclasses
    import json

    from conftest import PCAPS, run_pktipc

    def fields(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"reply"}

    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--wait-clients", "2")
    with pktipc.connect(b.name, "c", group="g"):
        r = run_pktipc("status", "--json", b.name)
        assert r.returncode == 0, r.stderr
        [st] = json.loads(r.stdout)
    assert set(st) == fields(pktipc.BrokerStats)
    assert set(st["counters"]) == fields(pktipc.BrokerCounters)
    assert set(st["slabs"]) == fields(pktipc.SlabStats)
    assert set(st["control"]) == fields(pktipc.ControlStats)
    [src], [cl], [g] = st["sources"], st["clients"], st["groups"]
    assert set(src) <= fields(pktipc.SourceStats)
    assert set(cl) == fields(pktipc.ClientStats) - {"tx"}        # tx: a client that sends
    assert set(g) == fields(pktipc.GroupStats)
    typed = pktipc.BrokerStats.from_reply(st)
    assert typed.client("c").group == "g" and typed.groups[0].members == ("c",)
    r = run_pktipc("status", "--json", "nobody")
    assert r.returncode == 1 and [set(x) for x in json.loads(r.stdout)] == [{"name", "error"}]


def test_typed_stats_example(broker) -> None:
    """examples/stats.py: `mypy --strict` passes on it, and it reports a broker."""
    import subprocess
    import sys

    from conftest import PCAPS, ROOT

    example = ROOT / "examples" / "stats.py"
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", str(example)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--wait-clients", "2")
    with pktipc.connect(b.name, "watcher"):
        r = subprocess.run([sys.executable, str(example), b.name], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(f"{b.name}: running, 0 packets")
    assert "  client watcher (group watcher, block): 0 packets" in r.stdout
    r = subprocess.run([sys.executable, str(example), "nobody"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
