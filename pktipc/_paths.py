"""Where brokers live: runtime directory, control endpoints, segment names."""

import os
import re
from pathlib import Path

from ._errors import PktipcError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")   # use with fullmatch
# The runtime directory: $RUNTIME_ENV, else ROOT_RUNTIME_DIR as root, else
# $XDG_RUNTIME_DIR/USER_RUNTIME_SUBDIR; a broker's socket is NAME + CONTROL_SUFFIX.
RUNTIME_ENV = "PKTIPC_RUNTIME_DIR"
ROOT_RUNTIME_DIR = "/run/pktipc"
USER_RUNTIME_SUBDIR = "pktipc"
CONTROL_SUFFIX = ".ctl"


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{kind} name {name!r}: use 1-48 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


# A recording is a client named RECORDING_PREFIX + its name: the broker
# counts them against --max-recordings by that name alone.
RECORDING_PREFIX = "rec."
MAX_RECORDING_NAME = 48 - len(RECORDING_PREFIX)


def check_recording_name(name: str) -> str:
    check_name("recording", name)
    if len(name) > MAX_RECORDING_NAME:
        raise ValueError(f"recording name {name!r}: at most {MAX_RECORDING_NAME} characters "
                         f"(its client is named {RECORDING_PREFIX}NAME)")
    return name


def is_recording(client: str) -> bool:
    return client.startswith(RECORDING_PREFIX)


def runtime_dir() -> Path:
    """$PKTIPC_RUNTIME_DIR, else /run/pktipc as root, else
    $XDG_RUNTIME_DIR/pktipc; never a place anyone could have made first."""
    env = os.environ.get(RUNTIME_ENV)
    if env:
        return Path(os.path.abspath(env))
    if os.geteuid() == 0:
        return Path(ROOT_RUNTIME_DIR)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise PktipcError("no runtime directory: XDG_RUNTIME_DIR is not set; set "
                          f"{RUNTIME_ENV} to a directory of your own")
    return Path(xdg) / USER_RUNTIME_SUBDIR


def control_endpoint(server: str) -> str:
    """`server` is a broker name or an endpoint ("ipc://...", "tcp://...")."""
    if "://" in server:
        return server
    check_name("broker", server)
    return f"ipc://{runtime_dir() / server}{CONTROL_SUFFIX}"


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def segment_prefix(broker: str) -> str:
    return f"pktipc.{broker}."


def segment_name(broker: str, epoch: int) -> str:
    return f"/{segment_prefix(broker)}{epoch:016x}"
