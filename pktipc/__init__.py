"""pktipc: capture packets once into shared memory, hand batches to named clients."""

from ._client.client import Batch, Client, Packet, broker_stats, brokers, connect
from ._client.tx import Tx
from ._errors import (
    BrokerGone,
    BrokerNotRunning,
    Busy,
    ClosedError,
    EndOfStream,
    LayoutError,
    NameTaken,
    PermissionDenied,
    PktipcError,
    Refused,
    SourceError,
    UntrustedBroker,
)
from ._layout import PKT_DTYPE

__all__ = [
    "PKT_DTYPE",
    "Batch",
    "BrokerGone",
    "BrokerNotRunning",
    "Busy",
    "Client",
    "ClosedError",
    "EndOfStream",
    "LayoutError",
    "NameTaken",
    "Packet",
    "PermissionDenied",
    "PktipcError",
    "Refused",
    "SourceError",
    "Tx",
    "UntrustedBroker",
    "broker_stats",
    "brokers",
    "connect",
]
