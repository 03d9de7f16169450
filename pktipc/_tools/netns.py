"""A network namespace of one's own, holding veth pairs: where the demo, the
tests and the benchmarks make live traffic, so that it never leaves them.
Frames are sent from inside with `python -m pktipc._tools.traffic`."""

from __future__ import annotations

import subprocess

from .._errors import PktipcError


class Namespace:
    """`ip netns add NAME`, with IPv6 off (no address, nothing of the
    kernel's own on its links); delete() removes it and its interfaces."""

    def __init__(self, name: str) -> None:
        self.name = name
        _run("ip", "netns", "add", name)
        try:
            self.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                      "net.ipv6.conf.default.disable_ipv6=1")
        except PktipcError:
            self.delete()
            raise

    def cmd(self, *args: str) -> list[str]:
        """`args` as a command run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def exec(self, *args: str, timeout: float = 60) -> str:
        """Runs `args` inside; its output, or PktipcError saying why not."""
        return _run(*self.cmd(*args), timeout=timeout)

    def ip(self, *args: str) -> None:
        _run("ip", "-n", self.name, *args)

    def veth(self, a: str, b: str, up: bool = True) -> None:
        """A veth pair a <-> b, both ends inside."""
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        for iface in (a, b) if up else ():
            self.ip("link", "set", iface, "up")

    def mac(self, iface: str) -> bytes:
        return bytes.fromhex(self.exec("cat", f"/sys/class/net/{iface}/address")
                             .strip().replace(":", ""))

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def _run(*cmd: str, timeout: float = 60) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PktipcError(f"{' '.join(cmd)}: {e}") from None
    if r.returncode != 0:
        raise PktipcError(f"{' '.join(cmd)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout
