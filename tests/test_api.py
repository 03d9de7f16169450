"""The public surface: what `import pktipc` offers, and the error taxonomy."""

import pytest

import pktipc
from pktipc._errors import refusal


def test_all_is_pinned() -> None:
    assert sorted(pktipc.__all__) == sorted([
        "PKT_DTYPE", "Batch", "BrokerGone", "BrokerNotRunning", "Busy", "Client",
        "ClosedError", "EndOfStream", "LayoutError", "NameTaken", "Packet", "PermissionDenied",
        "PktipcError", "Refused",
        "SourceError", "Tx", "UntrustedBroker", "broker_stats", "brokers", "connect",
    ])
    for name in pktipc.__all__:
        assert getattr(pktipc, name) is not None


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
