"""The broker's ZeroMQ edge: one ROUTER socket, where control frames come in
(with who sent them, as the kernel says) and go out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq

from .._errors import PktipcError
from .._paths import ipc_path


@dataclass(frozen=True)
class Credentials:
    """Who is at the other end of a local (ipc://) connection: the kernel's
    SO_PEERCRED, which libzmq hands over as the frames' Peer-Address
    ("host:uid:gid:pid"). Remote peers have none."""

    uid: int
    gid: int
    pid: int


def _credentials(frame: zmq.Frame) -> Credentials | None:
    try:
        addr = frame.get("Peer-Address")
    except zmq.ZMQError:
        return None
    parts = str(addr).rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return Credentials(int(parts[1]), int(parts[2]), int(parts[3]))


class ControlSocket:
    def __init__(self, endpoint: str, *, group_access: bool) -> None:
        self.endpoint = endpoint
        self.path: Path | None = ipc_path(endpoint)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.sock.setsockopt(zmq.LINGER, 1000)
        if self.path is not None:
            self.path.unlink(missing_ok=True)   # left by a dead broker; we hold the lock
        # Born with its final mode, in a directory no one else can write:
        # 0600, or 0660 with the group the (setgid) directory gives it.
        old = os.umask(0o117 if group_access else 0o177)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise PktipcError(f"cannot listen on {endpoint}: {e}") from None
        finally:
            os.umask(old)

    def receive(self) -> tuple[bytes, list[bytes], Credentials | None] | None:
        """One message: (peer, its frames, credentials), or None when none waits."""
        try:
            parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return parts[0].bytes, [p.bytes for p in parts[1:]], _credentials(parts[-1])

    def send(self, peer: bytes, frame: bytes) -> bool:
        """False when the peer cannot be reached (it is gone)."""
        try:
            self.sock.send_multipart([peer, frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
