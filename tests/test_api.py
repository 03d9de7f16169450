"""The public surface: what `import pktipc` offers, and the error taxonomy."""

import pytest
from pktipc._shm import lib

import pktipc
import pktipc.aio
from pktipc._errors import refusal


def test_all_is_pinned() -> None:
    assert sorted(pktipc.__all__) == sorted([
        "PKT_DTYPE", "Batch", "BrokerCounters", "BrokerGone", "BrokerNotRunning", "BrokerStats",
        "Client", "ClientCounters", "ClientStats", "ClosedError", "ControlStats", "Direction",
        "EndOfStream", "FilterError", "Flags", "GroupStats", "Iface", "LayoutError",
        "NameTaken", "Packet", "PermissionDenied", "PktipcError", "Refused", "SlabStats",
        "SourceError", "SourceStats", "UntrustedBroker", "broker_stats", "brokers", "connect",
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
