"""pktipc command line: serve, dump, record, status, top, exporter, demo, gateway,
keygen, relay, pcap-over-ip. No logic of its own: each command is a few lines over the
package's API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, BinaryIO

import zmq

from .. import _protocol as proto
from .._broker import broker as _broker
from .._broker import live as _live
from .._broker import relay as _relay
from .._broker import service as _service
from .._broker import tx as _tx
from .._broker import xdp as _xdp
from .._client import recording as _recording
from .._client.client import broker_stats, brokers, connect
from .._client.writer import ClientTally, RollingWriter, RotationLimit, TcpdumpFiles
from .._errors import EndOfStream, PktipcError
from .._net import gateway as _gateway
from .._net import pcapoverip as _poip
from .._stats import BrokerStats
from . import config as _config
from . import demo as _demo
from . import exporter as _exporter
from . import replay as _replay
from . import top as _top


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(2, f"pktipc: error: {message} (see {self.prog} --help)\n")


class _Intermixed(_Parser):
    """A command whose positionals may come before its options and after
    them: `record start REC [options] [filter]`."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:            # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    try:
        return int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _remote_keys(p: argparse.ArgumentParser) -> None:
    """The options of a client of a broker behind a gateway (tcp://)."""
    p.add_argument("--key", default=os.environ.get("PKTIPC_KEY"), metavar="FILE",
                   help="tcp://: this client's key pair, the .key_secret file of pktipc keygen "
                        "(default: $PKTIPC_KEY)")
    p.add_argument("--server-key", default=os.environ.get("PKTIPC_SERVER_KEY"), metavar="FILE",
                   help="tcp://: the gateway's public key, its .key file (default: "
                        "$PKTIPC_SERVER_KEY)")
    p.add_argument("--insecure", action="store_true",
                   help="tcp://: plain TCP to a gateway run with --insecure: no encryption, "
                        "no authentication of either end")


def _keys(a: argparse.Namespace) -> dict[str, Any]:
    if not a.server.startswith("tcp://"):
        return {}
    return {"key": a.key, "server_key": a.server_key, "insecure": a.insecure}


def _clients_options(s: argparse.ArgumentParser) -> None:
    """A broker's options of its ring and its clients (serve, relay)."""
    s.add_argument("--wait-clients", type=int, metavar="N",
                   help="start reading once N clients are attached (default: 1 for files, "
                        "0 for interfaces)")
    s.add_argument("--linger", action="store_true",
                   help="keep running after the end of the stream")
    s.add_argument("--slab-size", type=_size, metavar="BYTES",
                   help="bytes per slab (batch), e.g. 1M (default: 1M; --xdp: 64k, "
                        "descriptors of 2048 frames)")
    s.add_argument("--slabs", type=int, default=_broker.DEFAULT_SLAB_COUNT, metavar="N",
                   help=f"slabs in the ring (default: {_broker.DEFAULT_SLAB_COUNT})")
    s.add_argument("--credit", type=int, default=_broker.DEFAULT_CREDIT, metavar="N",
                   help="default batches a client may hold at once "
                        f"(default: {_broker.DEFAULT_CREDIT})")
    s.add_argument("--max-clients", type=int, default=_broker.MAX_CLIENTS, metavar="N",
                   help="clients attached at most; a drop client holds at most "
                        "(slabs - 1) / N batches (default: %(default)s)")
    s.add_argument("--max-recordings", type=int, default=_broker.MAX_RECORDINGS, metavar="N",
                   help="recordings (pktipc record) running at once at most, 0: none "
                        "(default: %(default)s)")
    s.add_argument("--allow-block", metavar="WHO", action="append", default=[],
                   help="interfaces: let WHO ask for the block policy, which lets one client "
                        "stall the capture for all: a client name or pattern (suricata-*), or "
                        "user:NAME; repeat, or separate with commas (files: anyone may)")
    s.add_argument("--max-connections", type=int, metavar="N",
                   help="control connections at most, the rest refused (default: 4 per "
                        "client, and 64 more)")
    s.add_argument("--control-rate", type=float, default=proto.CONTROL_RATE, metavar="N",
                   help="control messages a second a client (or a process not attached) may "
                        "send beyond one per batch, in bursts of 4 s worth; more are dropped, "
                        "and who keeps on is cut off (default: %(default)g)")
    s.add_argument("--evict-backoff", type=float, default=_broker.EVICT_BACKOFF, metavar="SEC",
                   help="a client evicted for holding a batch too long is refused this long "
                        "(default: %(default)s)")
    s.add_argument("--heartbeat", type=float, default=1.0, metavar="SEC",
                   help="heartbeat interval (default: 1)")
    s.add_argument("--liveness", type=float, default=30.0, metavar="SEC",
                   help="a client silent this long is dropped (default: 30)")
    s.add_argument("--allow-group", metavar="GROUP",
                   help="admit clients of this Unix group too (socket 0660, segment readable "
                        "by the group); default: the broker's user only")
    s.add_argument("--grace", type=float, default=0.0, metavar="SEC",
                   help="keep a lost client's place this long: back under its name, it "
                        "resumes where it stopped (default: 0)")


def _lease_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--lease", type=float, default=30.0, metavar="SEC",
                   help="a client holding a batch this long is evicted, 0: never "
                        "(default: 30)")


def _mbytes(text: str) -> int:
    """tcpdump -C: millions of bytes, or a size with k, m or g."""
    if text.strip()[-1:].lower() in ("k", "m", "g"):
        return _size(text)
    try:
        return int(text) * 1_000_000
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pktipc", description="Packet-sharing broker over shared memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="capture from interfaces, or read capture files, and "
                       "serve the packets to named clients")
    s.add_argument("--name", default="default", help="broker name (default: %(default)s)")
    s.add_argument("--config", metavar="FILE",
                   help="read options from this TOML file (keys as --print-config shows "
                        "them); options given here win")
    s.add_argument("--print-config", action="store_true",
                   help="print the effective configuration as TOML, and exit")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", dest="interfaces", action="append", metavar="IFACE",
                     help="capture on this interface; repeat to aggregate several")
    src.add_argument("-r", dest="files", action="append", metavar="FILE",
                     help="pcap or pcapng file; repeat to serve several one after another")
    s.add_argument("expression", nargs="*",
                   help="capture filter in tcpdump syntax (interfaces only)")
    s.add_argument("--filter", metavar="EXPR", help="the capture filter, as one argument")
    s.add_argument("-s", dest="snaplen", type=int, default=_live.DEFAULT_SNAPLEN,
                   metavar="SNAPLEN", help="bytes kept of each frame (default: %(default)s)")
    s.add_argument("--no-promisc", dest="promisc", action="store_false",
                   help="do not put the interfaces in promiscuous mode")
    s.add_argument("--no-vlan-reinsert", dest="vlan_reinsert", action="store_false",
                   help="leave a VLAN tag the kernel stripped in the descriptor only, not "
                        "back in the bytes")
    s.add_argument("--hw-timestamps", action="store_true",
                   help="timestamps from the interface's clock (fails where unsupported)")
    s.add_argument("--block-size", type=_size, default=_live.DEFAULT_BLOCK_SIZE,
                   metavar="BYTES", help="TPACKET_V3 block size (default: 1M)")
    s.add_argument("--blocks", type=int, default=_live.DEFAULT_BLOCK_COUNT, metavar="N",
                   help=f"blocks in each ring (default: {_live.DEFAULT_BLOCK_COUNT})")
    s.add_argument("--block-timeout", type=int, default=_live.DEFAULT_BLOCK_TIMEOUT_MS,
                   metavar="MS", help="a block is handed over at the latest this long after "
                   f"its first packet (default: {_live.DEFAULT_BLOCK_TIMEOUT_MS}; lower for "
                   "latency)")
    s.add_argument("--fanout", nargs="?", const="auto", metavar="ID",
                   help="join AF_PACKET fanout group ID (interface k joins ID+k), so that "
                        "several brokers share an interface; without ID, a group id no one "
                        "uses, chosen by the kernel (shown by status)")
    s.add_argument("--fanout-mode", default="hash", choices=sorted(_live.FANOUT_MODES),
                   help="how the kernel spreads packets over the group (default: hash, "
                        "with IP defragmentation)")
    s.add_argument("--xdp", action="store_true",
                   help="capture through AF_XDP (one interface): the kernel writes each frame "
                        "into the segment, the broker copies nothing; the frames no longer "
                        "reach the kernel's stack: for a tap or mirror port")
    s.add_argument("--queues", metavar="all|N,...",
                   help="--xdp: the receive queues to capture, one socket each "
                        "(default: all)")
    s.add_argument("--xdp-mode", choices=sorted(_xdp.MODES),
                   help="--xdp: XDP in the driver (native, the default) or after the kernel "
                        "made an skb (skb: any driver, slower)")
    s.add_argument("--zero-copy", action="store_true",
                   help="--xdp: refuse to start unless the driver does zero-copy AF_XDP "
                        "(default: zero-copy where the driver has it, else copy)")
    s.add_argument("--frames", type=int, metavar="N",
                   help=f"--xdp: AF_XDP frames in the segment, 2 or 4 KiB each by the MTU "
                        f"(default: {_xdp.DEFAULT_FRAMES})")
    s.add_argument("--tx", action="append", nargs="?", const=_tx.ALL, metavar="IFACE",
                   help="let clients send frames out of IFACE (without IFACE: every captured "
                        "interface) through a TX ring of the broker's; repeat for several")
    s.add_argument("--allow-tx", action="append", default=[], metavar="USER",
                   help="users whose clients may send, beyond the broker's own user and "
                        "root; repeat, or separate with commas")
    s.add_argument("--tx-frames", type=int, default=_tx.DEFAULT_FRAMES, metavar="N",
                   help="frames in each interface's TX ring (default: %(default)s)")
    s.add_argument("--tx-qdisc-bypass", action="store_true",
                   help="send straight to the driver, past the queueing discipline (faster; "
                        "the frames are then not seen by packet sockets on the interface, "
                        "the broker's own capture included)")
    s.add_argument("--user", metavar="USER",
                   help="run as USER once the capture sockets are open")
    pace = s.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, metavar="X",
                      help="pace by the files' timestamps, X times real time")
    pace.add_argument("--realtime", action="store_const", const=1.0, dest="speed",
                      help="pace by the files' timestamps (same as --speed 1)")
    s.add_argument("--loop", type=int, default=1, metavar="N",
                   help="serve the files N times, 0 for ever (default: 1)")
    _clients_options(s)
    s.add_argument("--tunnel-hash", action="store_true",
                   help="balance GRE, IP-in-IP, VXLAN and GTP-U traffic on the inner flow")
    _lease_option(s)

    r = sub.add_parser("relay", help="re-serve a broker of another host here: a broker whose "
                       "source is a remote broker")
    r.add_argument("--from", dest="source", required=True, metavar="tcp://HOST:PORT/NAME",
                   help="the remote broker, through its gateway")
    r.add_argument("--name", required=True, help="this broker's name, for local clients")
    r.add_argument("--client", help="the relay's name on the remote broker (default: "
                   "relay-NAME)")
    r.add_argument("--group", help="a group of the remote broker to be a member of")
    r.add_argument("--balance", choices=("flow", "round-robin"),
                   help="the group's mode, if the relay is its first member")
    r.add_argument("--policy", choices=("block", "drop"),
                   help="the relay's policy on the remote broker (default: the remote "
                        "broker's); local clients get it by default")
    r.add_argument("--remote-credit", type=int, metavar="N",
                   help="batches the relay holds at most on the remote broker")
    r.add_argument("--timeout", type=float, default=5.0, metavar="SEC",
                   help="for attaching to the remote broker (default: 5)")
    r.add_argument("--reconnect", type=float, default=proto.DEFAULT_RECONNECT, metavar="SEC",
                   help="if the remote broker or the link is lost, how long to look for it "
                        "(default: %(default)g)")
    _remote_keys(r)
    _clients_options(r)
    _lease_option(r)

    d = sub.add_parser("dump", help="write what a client receives to a capture file")
    d.add_argument("--server", default="default",
                   help="broker name or endpoint; tcp://HOST:PORT/NAME: broker NAME of another "
                        "host, through its gateway")
    d.add_argument("--client", default=f"dump-{os.getpid()}", help="client name")
    d.add_argument("--group", help="share the packets of this group with its other members "
                                   "(default: a group of its own)")
    d.add_argument("--balance", choices=("flow", "round-robin"),
                   help="how the group divides its packets, if it is the first member "
                        "(default: flow)")
    d.add_argument("-w", dest="out", required=True, metavar="FILE",
                   help="output file, - for stdout")
    d.add_argument("-c", dest="count", type=int, metavar="COUNT", help="stop after COUNT packets")
    d.add_argument("-C", dest="file_size", type=_mbytes, metavar="SIZE",
                   help="start a new file before one would pass SIZE millions of bytes (or "
                        "SIZE with k, m, g: KiB, MiB, GiB), as tcpdump -C: FILE, FILE1, ...")
    d.add_argument("-G", dest="rotate_seconds", type=float, metavar="SEC",
                   help="start a new file every SEC seconds, as tcpdump -G; strftime() "
                        "conversions in FILE (e.g. %%H%%M%%S) name each")
    d.add_argument("-W", dest="file_count", type=int, metavar="N",
                   help="with -C: N files, FILE0 to FILE<N-1>, the oldest overwritten; "
                        "with -G alone: stop after N files")
    d.add_argument("--format", choices=("pcap", "pcapng"), default="pcap")
    d.add_argument("--policy", choices=("block", "drop"), help="default: the broker's")
    d.add_argument("--credit", type=int, metavar="N")
    d.add_argument("--timeout", type=float, default=5.0, metavar="SEC",
                   help="for connecting (default: 5)")
    _remote_keys(d)
    d.add_argument("expression", nargs="*",
                   help="keep only the packets this filter (tcpdump's syntax) matches")

    rp = sub.add_parser("replay", help="send a capture file's frames out of an interface, "
                        "through a broker that sends there (serve -i IFACE --tx)")
    rp.add_argument("-i", dest="iface", required=True, metavar="IFACE",
                    help="the broker's interface to send on")
    rp.add_argument("-r", dest="files", action="append", required=True, metavar="FILE",
                    help="pcap or pcapng file; repeat to send several one after another")
    rpace = rp.add_mutually_exclusive_group()
    rpace.add_argument("--speed", type=float, default=1.0, metavar="X",
                       help="at the file's pace, X times real time (default: 1)")
    rpace.add_argument("--pps", type=float, metavar="N", help="N frames a second")
    rpace.add_argument("--topspeed", action="store_true", help="as fast as they go")
    rp.add_argument("--loop", type=int, default=1, metavar="N",
                    help="send the files N times, 0 for ever (default: 1)")
    rp.add_argument("--server", default="default", help="broker name or endpoint")
    rp.add_argument("--client", default=f"replay-{os.getpid()}", help="client name")
    rec = sub.add_parser("record", help="named rolling pcapng recordings that outlive "
                         "whoever started them: start, attach, stop, list")
    rsub = rec.add_subparsers(dest="rcmd", required=True, parser_class=_Intermixed)
    rs = rsub.add_parser("start", help="start recording: a client of the broker writing a "
                         "rolling set of pcapng files, the oldest removed")
    rs.add_argument("--server", default="default", help="broker name (default: %(default)s)")
    rs.add_argument("rec", metavar="REC", help="the recording's name, unique on the broker")
    rs.add_argument("expression", nargs="*",
                    help="record only what this filter (tcpdump syntax) accepts")
    rs.add_argument("-w", dest="dir", default=".", metavar="DIR",
                    help="directory of the files, REC_<number>_<UTC time>.pcapng "
                         "(default: the current one)")
    rs.add_argument("--max-size", type=_size, metavar="SIZE",
                    help="bytes a file holds at most, e.g. 100M (default: 100 MB, unless "
                         "--max-age)")
    rs.add_argument("--files", type=int, metavar="N",
                    help="files kept at most, the oldest removed (default: 10, unless "
                         "--max-age)")
    rs.add_argument("--max-age", type=float, metavar="SEC",
                    help="keep the last SEC seconds: a file is removed once it ended more "
                         "than SEC ago; each spans SEC/10 (SEC/--files)")
    rs.add_argument("--group", help="share the packets of this group with its other members")
    rs.add_argument("--policy", choices=proto.POLICIES, help="default: the broker's")
    rs.add_argument("--detach", action="store_true",
                    help="run on after this command returns, until pktipc record stop")
    rs.add_argument("--timeout", type=float, default=5.0, metavar="SEC",
                    help="for attaching to the broker (default: 5)")
    ra = rsub.add_parser("attach", help="what a recording holds, from its oldest packet, as "
                         "one pcapng stream, then its live packets until Ctrl-C")
    ra.add_argument("rec", metavar="REC")
    ra.add_argument("--server", help="the broker, if several have a recording named REC")
    ra.add_argument("-w", dest="out", default="-", metavar="FILE",
                    help="output file, - for stdout (default)")
    ra.add_argument("--no-follow", dest="follow", action="store_false",
                    help="stop at what the recording holds now")
    rp = rsub.add_parser("stop", help="stop a recording and forget it (its files stay)")
    rp.add_argument("rec", metavar="REC")
    rp.add_argument("--server", help="the broker, if several have a recording named REC")
    rl = rsub.add_parser("list", help="recordings: broker, state, packets, bytes, drops, "
                         "files, oldest and newest packet")
    rl.add_argument("--server", help="only this broker's")
    rl.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="list brokers, their counters and clients")
    st.add_argument("names", nargs="*", help="brokers (default: every one running)")
    st.add_argument("--json", action="store_true")

    tp = sub.add_parser("top", help="brokers, sources, groups and clients, live: rates, "
                        "drops by stage, ring occupancy (q quits)")
    tp.add_argument("names", nargs="*", help="brokers (default: every one running)")
    tp.add_argument("-d", dest="interval", type=float, default=1.0, metavar="SEC",
                    help="seconds between refreshes (default: 1)")
    tp.add_argument("-n", dest="count", type=int, metavar="COUNT",
                    help="stop after COUNT refreshes (default: run until q or Ctrl-C)")

    ex = sub.add_parser("exporter", help="serve every broker's counters to Prometheus")
    ex.add_argument("names", nargs="*", help="brokers (default: every one running)")
    ex.add_argument("--listen", default=_exporter.DEFAULT_LISTEN, metavar="ADDR:PORT",
                    help="where /metrics is served (default: %(default)s)")
    ex.add_argument("--timeout", type=float, default=1.0, metavar="SEC",
                    help="for each broker's answer, within a scrape (default: 1)")

    gw = sub.add_parser("gateway", help="serve a broker's clients on other hosts, over TCP "
                        "(CURVE-encrypted and authenticated)")
    gw.add_argument("--server", default="default", help="the broker's name (default: "
                    "%(default)s)")
    gw.add_argument("--listen", default=f"127.0.0.1:{_gateway.DEFAULT_PORT}",
                    metavar="ADDR:PORT",
                    help="where remote clients connect (default: %(default)s, loopback only; "
                         "0.0.0.0:PORT listens on every address)")
    gw.add_argument("--key", metavar="FILE",
                    help="the gateway's key pair, a .key_secret file of pktipc keygen; its "
                         ".key is what clients give as --server-key")
    gw.add_argument("--keys", metavar="DIR",
                    help="the client public keys (.key files) admitted; read again when it "
                         "changes")
    gw.add_argument("--insecure", action="store_true",
                    help="plain TCP: packets in clear and any peer admitted; only on a "
                         "network that is already trusted (or through a tunnel)")
    gw.add_argument("--heartbeat", type=float, default=1.0, metavar="SEC",
                    help="heartbeat interval to remote clients (default: 1)")
    gw.add_argument("--liveness", type=float, default=10.0, metavar="SEC",
                    help="a remote client silent this long is lost; the broker keeps its "
                         "place for its --grace (default: 10)")
    gw.add_argument("--max-clients", type=int, default=_gateway.MAX_SESSIONS, metavar="N",
                    help="remote clients at most (default: %(default)s)")

    po = sub.add_parser(
        "pcap-over-ip", help="serve a broker's packets as pcap streams on TCP (tshark -i "
        "TCP@HOST:PORT, Arkime, Zeek's PcapOverTcp): every connection a client",
        description="PCAP-over-IP has no authentication and no encryption: keep it on "
        "loopback (the default) or a trusted network; across others, use remote clients "
        "(pktipc gateway, CURVE) or a TLS tunnel.")
    po.add_argument("--server", default="default", help="the broker's name (default: "
                    "%(default)s)")
    po.add_argument("--listen", action="append", metavar="ADDR:PORT",
                    help=f"where readers connect (default: 127.0.0.1:{_poip.DEFAULT_PORT} "
                         "unless --connect is given; 0.0.0.0:PORT for every address); repeat "
                         "for several")
    po.add_argument("--connect", action="append", metavar="HOST:PORT", default=[],
                    help="send to a reader that listens (Arkime's server mode, NetworkMiner), "
                         "dialling it again when it goes away; repeat for several")
    po.add_argument("--group", help="the connections are members of this flow group: "
                    "each flow, whole, to one of them (default: each gets everything)")
    po.add_argument("--balance", choices=("flow", "round-robin"),
                    help="the group's mode, if its first member (default: flow)")
    po.add_argument("--policy", choices=("block", "drop"),
                    help="each connection's (default: the broker's)")
    po.add_argument("--credit", type=int, metavar="N",
                    help="batches a connection holds while they are written")

    kg = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key (public) and "
                        "NAME.key_secret")
    kg.add_argument("dir", help="directory to write them in")
    kg.add_argument("name", nargs="?", default="pktipc", help="file name (default: "
                    "%(default)s)")

    de = sub.add_parser("demo", help="a broker, two clients, a live status line: live on a "
                        "veth pair of its own (as root), else from a capture file")
    de.add_argument("-r", dest="file", metavar="FILE",
                    help="serve this capture file instead of a live capture")
    de.add_argument("--clients", type=int, default=2)
    de.add_argument("--packets", type=int, default=8000, metavar="N",
                    help="live: frames to send (default: 8000)")
    de.add_argument("--rate", type=float, default=2000.0, metavar="PPS",
                    help="live: frames per second (default: 2000)")
    de.add_argument("--speed", type=float, default=1.0, metavar="X",
                    help="file: times real time (default: 1)")
    return p


def _fanout_id(text: str | None) -> int | None:
    if text is None or text == "auto":
        return None if text is None else _live.FANOUT_AUTO
    try:
        gid = int(text, 0)
    except ValueError:
        gid = -1
    if gid < 0:
        raise ValueError(f"--fanout {text!r}: not a group id (0-65535)")
    return gid


def _xdp_options(a: argparse.Namespace, filt: str) -> _xdp.XdpOptions:
    if not a.interfaces or len(a.interfaces) != 1:
        raise ValueError("--xdp captures one interface: give -i once")
    other = {"--fanout": a.fanout is not None, "--hw-timestamps": a.hw_timestamps,
             "--no-vlan-reinsert": not a.vlan_reinsert}
    if any(other.values()):
        raise ValueError(f"{', '.join(o for o, v in other.items() if v)}: not with --xdp "
                         "(AF_XDP leaves VLAN tags in the bytes and stamps frames itself)")
    queues = None
    if a.queues not in (None, "all"):
        try:
            queues = [int(q) for q in a.queues.split(",")]
        except ValueError:
            raise ValueError(f"--queues {a.queues}: 'all', or queue numbers separated by "
                             "commas") from None
    return _xdp.XdpOptions(
        interface=a.interfaces[0], queues=queues, mode=a.xdp_mode or "native",
        zero_copy=a.zero_copy, filter=filt, snaplen=a.snaplen, promisc=a.promisc,
        frames=a.frames or _xdp.DEFAULT_FRAMES, batch_timeout_ms=a.block_timeout)


def cmd_serve(a: argparse.Namespace) -> int:
    if a.print_config:
        print(_config.dump(_config.subparser(_parser(), "serve"), a), end="")
        return 0
    if a.expression and a.filter is not None:
        raise ValueError("give the filter either as --filter or after the options, not both")
    filt = a.filter if a.filter is not None else " ".join(a.expression)
    live = xdp = None
    xdp_only = {"--queues": a.queues, "--xdp-mode": a.xdp_mode, "--zero-copy": a.zero_copy,
                "--frames": a.frames}
    if a.xdp:
        xdp = _xdp_options(a, filt)
    elif any(v not in (None, False) for v in xdp_only.values()):
        given = [o for o, v in xdp_only.items() if v not in (None, False)]
        raise ValueError(f"{', '.join(given)}: AF_XDP options, for --xdp")
    elif a.interfaces:
        live = _live.LiveOptions(
            interfaces=a.interfaces, filter=filt, snaplen=a.snaplen, block_size=a.block_size,
            block_count=a.blocks, block_timeout_ms=a.block_timeout, promisc=a.promisc,
            vlan_reinsert=a.vlan_reinsert, hw_timestamps=a.hw_timestamps,
            fanout=_fanout_id(a.fanout), fanout_mode=a.fanout_mode)
    elif filt:
        raise ValueError("a capture filter applies to interfaces (-i), not to files")
    opts = _broker.ServeOptions(
        name=a.name, files=a.files or [], live=live, xdp=xdp, loops=a.loop, speed=a.speed,
        user=a.user, tunnel_hash=a.tunnel_hash,
        tx=[w for arg in a.tx or [] for w in arg.split(",") if w],
        allow_tx=[w for arg in a.allow_tx for w in arg.split(",") if w],
        tx_frames=a.tx_frames, tx_qdisc_bypass=a.tx_qdisc_bypass,
        **_clients_args(a, _xdp.DEFAULT_SLAB_SIZE if xdp else _broker.DEFAULT_SLAB_SIZE))
    sys.stderr = _service.journal_stderr(sys.stderr)   # levels, under systemd
    return _broker.Broker(opts, log=sys.stderr).serve()


def _clients_args(a: argparse.Namespace,
                  slab_size: int = _broker.DEFAULT_SLAB_SIZE) -> dict[str, Any]:
    return dict(
        wait_clients=a.wait_clients, linger=a.linger, slab_size=a.slab_size or slab_size,
        slab_count=a.slabs, credit=a.credit, max_clients=a.max_clients,
        max_recordings=a.max_recordings,
        heartbeat=a.heartbeat, liveness=a.liveness, lease=a.lease or None, unix_group=a.allow_group,
        grace=a.grace, evict_backoff=a.evict_backoff,
        max_connections=a.max_connections, control_rate=a.control_rate,
        allow_block=[w for arg in a.allow_block for w in arg.split(",") if w])


def cmd_relay(a: argparse.Namespace) -> int:
    relay = _relay.RelayOptions(
        url=a.source, client=a.client or f"relay-{a.name}", group=a.group, balance=a.balance,
        policy=a.policy, credit=a.remote_credit, key=a.key, server_key=a.server_key,
        insecure=a.insecure, timeout=a.timeout, reconnect=a.reconnect)
    opts = _broker.ServeOptions(name=a.name, relay=relay, **_clients_args(a))
    sys.stderr = _service.journal_stderr(sys.stderr)
    return _broker.Broker(opts, log=sys.stderr).serve()


def cmd_dump(a: argparse.Namespace) -> int:
    if a.count is not None and a.count < 1:
        raise ValueError("-c COUNT must be at least 1")
    rolling = _rolling_options(a)
    with connect(a.server, a.client, group=a.group, balance=a.balance, policy=a.policy,
                 credit=a.credit, timeout=a.timeout, filter=" ".join(a.expression),
                 **_keys(a)) as client:
        files = TcpdumpFiles(a.out, by_size=a.file_size is not None, every=a.rotate_seconds,
                             ring=a.file_count)
        # the broker's counters are read from its segment: not across hosts
        tally = None if a.server.startswith("tcp://") else ClientTally(client)
        rw = RollingWriter(_stdout if a.out == "-" else files.open, client.ifaces, a.format,
                           max_size=a.file_size, max_age=a.rotate_seconds,
                           statistics=tally.statistics if tally else None,
                           opened=tally.opened if tally else None)
        try:
            rw.start()
            while a.count is None or rw.packets < a.count:
                try:
                    batch = client.next_batch(timeout=0.2 if rolling else None)
                except EndOfStream:
                    break
                if batch is None:
                    rw.tick()
                    continue
                with batch:
                    idx = batch.mine if a.count is None else batch.mine[:a.count - rw.packets]
                    rw.write(batch.descriptors, batch.buffer(), idx)
                if tally is not None:
                    tally.seen()
        except RotationLimit as e:
            print(f"pktipc: {e}", file=sys.stderr)
            return 0
        finally:
            rw.close()
        if client.end_error and a.count is None:
            raise PktipcError(f"stream ended early: {client.end_error}")
    return 0


def _rolling_options(a: argparse.Namespace) -> bool:
    if a.file_size is not None and a.file_size < 1:
        raise ValueError("-C SIZE must be at least 1 byte")
    if a.rotate_seconds is not None and not (0 < a.rotate_seconds < float("inf")):
        raise ValueError("-G SEC must be a positive number of seconds")
    if a.file_count is not None and a.file_count < 1:
        raise ValueError("-W N must be at least 1")
    if a.file_count is not None and a.file_size is None and a.rotate_seconds is None:
        raise ValueError("-W needs -C or -G")
    rolling = a.file_size is not None or a.rotate_seconds is not None
    if rolling and a.out == "-":
        raise ValueError("-C and -G write files: give -w FILE, not -")
    return rolling


def _stdout(number: int, now_ns: int) -> tuple[BinaryIO, str]:
    return os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0), "-"


def cmd_record(a: argparse.Namespace) -> int:
    if a.rcmd == "start":
        return _recording.start(_recording.Spec(
            name=a.rec, server=a.server, dir=a.dir, max_size=a.max_size, files=a.files,
            max_age=a.max_age, group=a.group, policy=a.policy, filter=" ".join(a.expression),
            detached=a.detach, timeout=a.timeout))
    if a.rcmd == "attach":
        out = sys.stdout.buffer if a.out == "-" else open(a.out, "wb")  # noqa: SIM115
        try:
            _recording.attach(a.rec, out, server=a.server, follow=a.follow)
        finally:
            if out is not sys.stdout.buffer:
                out.close()
        return 0
    if a.rcmd == "stop":
        st = _recording.stop(a.rec, a.server)
        what = (f": {st['packets']} packets, {len(st['files'])} files kept in {st['dir']}"
                if st else "")
        print(f"pktipc: recording {a.rec!r} stopped{what}", file=sys.stderr)
        return 0
    recs = _recording.recordings(a.server)
    print(json.dumps(recs, indent=2) if a.json else _recording.list_text(recs))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    names = a.names or brokers()
    result: list[BrokerStats | tuple[str, str]] = []
    for name in names:
        try:
            result.append(broker_stats(name))
        except PktipcError as e:
            result.append((name, str(e)))
    ok = all(isinstance(r, BrokerStats) for r in result)
    if a.json:
        print(json.dumps([r.reply if isinstance(r, BrokerStats) else
                          {"name": r[0], "error": r[1]} for r in result], indent=2))
        return 0 if ok else 1
    if not result:
        print("no broker is running")
    for r in result:
        print(_status_text(r) if isinstance(r, BrokerStats) else f"{r[0]}: {r[1]}")
    return 0 if ok else 1


def _status_text(r: BrokerStats) -> str:
    c = r.counters
    lines = [
        f"{r.name}  pid {r.pid}  {r.state}  up {r.uptime_s:.1f} s  {r.endpoint}",
        f"  packets {c.packets}  bytes {c.bytes}  batches {c.batches}  "
        f"broker drops {c.broker_drops}  client drops {c.client_drops}  "
        f"protocol errors {c.protocol_errors}  slabs free {r.slabs.free}/{r.slabs.count}",
    ]
    for s in r.sources:
        line = f"  source {s.name}  linktype {s.linktype}  packets {s.packets}  bytes {s.bytes}"
        if s.kind == "interface":
            line += (f"  kernel: packets {s.kernel_packets} drops {s.kernel_drops} "
                     f"freezes {s.kernel_freezes}")
            if s.fanout_id is not None:
                line += f"  fanout {s.fanout_id} ({s.fanout_mode})"
            if s.xdp is not None:
                x = s.xdp
                line += (f"  AF_XDP {x.mode} mode, {'zero-copy' if x.zero_copy else 'copy'}"
                         f", queue{'s' if len(x.queues) > 1 else ''} "
                         f"{','.join(map(str, x.queues))}")
        if s.tx is not None:
            errors = " ".join(f"{k} {v}" for k, v in sorted(s.tx.kernel_errors.items()))
            line += (f"\n    sends: frames {s.tx.sent}  pending {s.tx.pending}  "
                     f"longest {s.tx.max_len}  kernel errors {errors or 0}")
        lines.append(line)
    for g in r.groups:
        lines.append(f"  group {g.name}  {g.balance}  {len(g.members)} member(s)  "
                     f"{'shared' if g.shared else 'own'}  joined or left "
                     f"{g.changes}  packets {g.packets}")
        for cl in map(r.client, g.members):
            away = "" if cl.attached else "  (detached)"
            lines.append(f"    client {cl.name}  slot {cl.slot}  {cl.policy}  "
                         f"pid {cl.pid}  packets {cl.packets}  batches {cl.batches}  "
                         f"held {cl.held}/{cl.credit}  queued {cl.queued}  "
                         f"drops {cl.drops}{away}")
            if cl.tx is not None:
                t = cl.tx
                refused = " ".join(f"{k} {v}" for k, v in sorted(t.refused.items()))
                lines.append(f"      sends: submitted {t.submitted}  sent {t.sent}  "
                             f"refused {sum(t.refused.values())}"
                             f"{f' ({refused})' if refused else ''}  in ring {t.in_ring}  "
                             f"waiting {t.waiting}")
    return "\n".join(lines)


def cmd_replay(a: argparse.Namespace) -> int:
    speed = None if a.topspeed or a.pps is not None else a.speed
    r = _replay.replay(a.server, a.client, a.iface, a.files, speed=speed, pps=a.pps,
                       loops=a.loop)
    print(r.summary(a.iface), flush=True)
    return 0


def cmd_top(a: argparse.Namespace) -> int:
    return _top.run(a.names, a.interval, a.count)


def cmd_exporter(a: argparse.Namespace) -> int:
    sys.stderr = _service.journal_stderr(sys.stderr)
    return _exporter.serve(a.listen, a.names, a.timeout,
                           log=lambda line: print(line, file=sys.stderr, flush=True))


def cmd_gateway(a: argparse.Namespace) -> int:
    opts = _gateway.GatewayOptions(
        server=a.server, listen=_gateway.listen_endpoint(a.listen, _gateway.DEFAULT_PORT),
        keys=a.keys, key=a.key, insecure=a.insecure, heartbeat=a.heartbeat,
        liveness=a.liveness, max_clients=a.max_clients)
    sys.stderr = _service.journal_stderr(sys.stderr)
    return _gateway.Gateway(opts, log=sys.stderr).serve()


def cmd_pcap_over_ip(a: argparse.Namespace) -> int:
    listen = a.listen or ([] if a.connect else [f"127.0.0.1:{_poip.DEFAULT_PORT}"])
    opts = _poip.PcapOverIpOptions(
        server=a.server, listen=[_poip.host_port(x, "127.0.0.1") for x in listen],
        connect=[_poip.host_port(x, None) for x in a.connect], group=a.group,
        balance=a.balance, policy=a.policy, credit=a.credit)
    sys.stderr = _service.journal_stderr(sys.stderr)
    return _poip.PcapOverIp(opts, log=sys.stderr).serve()


def cmd_keygen(a: argparse.Namespace) -> int:
    public, secret = _gateway.keygen(a.dir, a.name)
    print(f"{public}: the public key, to give to the other end")
    print(f"{secret}: the key pair, to keep (readable by you only)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    return _demo.run(a.file, a.clients, a.speed, a.packets, a.rate)


def main(argv: list[str] | None = None) -> int:
    a = _config.parse(_parser, argv)
    run = {"serve": cmd_serve, "dump": cmd_dump, "status": cmd_status, "record": cmd_record,
           "demo": cmd_demo, "exporter": cmd_exporter, "top": cmd_top,
           "gateway": cmd_gateway, "keygen": cmd_keygen, "relay": cmd_relay,
           "pcap-over-ip": cmd_pcap_over_ip, "replay": cmd_replay}[a.cmd]
    try:
        return run(a)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PktipcError, ValueError, OSError, zmq.ZMQError) as e:
        if a.debug:
            raise
        print(f"pktipc: error: {e}", file=sys.stderr)
        return 1
