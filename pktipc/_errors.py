"""pktipc's exceptions: one base class, one exception per thing a user handles."""


class PktipcError(Exception):
    """Base class of every error pktipc raises."""


class BrokerNotRunning(PktipcError):
    """No broker answers at the control endpoint."""


class Refused(PktipcError):
    """The broker refused the request; `code` says why (e.g. "name-taken")."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class NameTaken(Refused):
    """Another live client already uses this name on the broker."""


class PermissionDenied(PktipcError):
    """The broker does not admit this user (see `pktipc serve --allow-group`)."""


class UntrustedBroker(PktipcError):
    """What answers as the broker is not owned as a broker's socket or
    segment must be (by the runtime directory's owner, or root): another
    user may be posing as the broker."""


class BrokerGone(PktipcError):
    """The broker stopped answering or evicted this client; the cause, if
    any, is in __cause__."""


class ClosedError(PktipcError):
    """The client or batch was closed (or released) by this process."""


class Busy(PktipcError):
    """Every slot of the TX area waits for the broker, and the Tx does not
    wait (client.tx(wait=False)): try again later."""


class LayoutError(PktipcError):
    """The shared-memory segment is not a layout this version reads."""


class FilterError(PktipcError, ValueError):
    """libpcap refused a filter expression (its message says why), or the
    expression cannot apply to the link type of one of the broker's sources."""


class SourceError(PktipcError):
    """A packet source (capture file, interface) cannot be used."""


def refusal(code: str, text: str) -> Refused:
    """The exception for a broker's ERROR reply, by its code."""
    cls = NameTaken if code == "name-taken" else Refused
    return cls(code, text)


class EndOfStream(Exception):  # noqa: N818 - a signal, not an error
    """The broker has sent its last batch: no more packets will come.

    Distinct from a timeout, which returns None. Not a PktipcError: reaching
    the end of a capture file is not a failure.
    """
