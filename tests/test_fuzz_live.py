"""A live broker under hostile control traffic.

A real broker serves a capture file to a well-behaved client while raw
ZeroMQ sockets send it thousands of hostile control frames from a seeded
generator (deterministic: set PKTIPC_FUZZ_SEED to try another seed):
random bytes, truncated and over-long frames, msgpack of the wrong shape,
every message type of the protocol with fields missing, extra or of the
wrong type or range, bad UTF-8, wrong versions, multi-part messages, REQ
envelopes, HELLOs that steal names, clients that attach and then release
what they do not hold, release twice, never release, or vanish.

The broker must stay up, refuse every malformed frame with exactly one ERROR
(and count it), keep to the protocol in all it sends, deliver the whole
capture byte-exact and in order to the good client, and exit 0 leaving
nothing behind.

Replies to one socket come in the order its frames were sent, so every
chunk of frames ends with a STATS "fence": once the fence's reply is in,
every reply owed for the chunk must be in too, and the ERRORs received for
the chunk must be what the chunk deserved.
"""

from __future__ import annotations

import os
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
from conftest import PCAPS
from pcapref import read_pcap

import pktipc
from pktipc import _protocol as proto

SEED = int(os.environ.get("PKTIPC_FUZZ_SEED", "20240611"))
CAPTURE = PCAPS / "resp_1_benchmark.pcap"     # 150 packets (up to 4 KiB), served 30 times
LOOPS = 30
STEPS = 200             # hostile steps, interleaved with the good client's batches
WAIT = 5.0              # the longest wait for any one reply (s)
BUDGET = 60.0           # hard bound on the whole exchange (s)

U32, U64 = proto.U32, proto.U64
I64_MIN = -(1 << 63)
MAX_FRAME = proto.MAX_FRAME
ZMQ_MAX = 1 << 20       # the broker's ZMQ_MAXMSGSIZE: a longer frame drops the connection
BROKER_TYPES = {"error", "welcome", "stats_reply", "batch", "heartbeat", "eos", "evict", "gap"}
ERROR_CODES = {"malformed", "version", "unknown-type", "bad-field", "too-large",
               "balance-mismatch", "group-mismatch", "group-private", "group-taken",
               "not-attached", "unexpected", "bad-release", "name-taken", "too-many-clients"}
MAP_HEADERS = set(range(0x80, 0x90)) | {0xDE, 0xDF}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")   # the protocol's client names
NAME_CHARS = string.ascii_letters + string.digits + "_.-"
FROM_PEERS = {"hello", "release", "stats", "bye", "heartbeat"}

# msgpack cannot pack a lone surrogate: this placeholder is swapped, after
# packing, for invalid UTF-8 (CESU-8 surrogates) of the same length.
SURR = "\x01SURROGATE"
SURR_BYTES = b"\xed\xa0\x80\xed\xb0\x80\xed\xbf\xbf!"
assert len(SURR.encode()) == len(SURR_BYTES)

# Every field of every message type: (kind, None allowed). Kinds: ("int", lo,
# hi), ("str", longest), ("name",), ("policy",), ("balance",), ("seqs",), ("slots",),
# ("bytes",), ("map",).
_U32F = (("int", 0, U32), False)
_U64F = (("int", 0, U64), False)
_MS = (("int", 1, U32), False)
_CODE_TEXT = {"code": (("str", 64), False), "text": (("str", proto.MAX_TEXT), False)}
KINDS: dict[str, dict[str, tuple[tuple[Any, ...], bool]]] = {
    "hello": {"name": (("name",), False), "group": (("name",), True),
              "policy": (("policy",), True), "credit": (("int", 1, proto.MAX_CREDIT), True),
              "pid": _U32F, "balance": (("balance",), True)},
    "release": {"seqs": (("seqs",), False)},
    "stats": {},
    "bye": {},
    "heartbeat": {},
    "welcome": {"shm": (("str", 255), False), "epoch": _U64F, "layout": _U32F, "slot": _U32F,
                "credit": (("int", 1, proto.MAX_CREDIT), False), "policy": (("policy",), False),
                "heartbeat_ms": _MS, "liveness_ms": _MS, "group": (("name",), False),
                "balance": (("balance",), False)},
    "batch": {"seq": _U64F, "slab": _U32F, "gen": _U32F, "n": _MS,
              "members": (("slots",), False), "mask": (("bytes",), True)},
    "gap": {"from": _U64F, "to": _U64F},
    "eos": {"error": (("str", 1024), True)},
    "error": dict(_CODE_TEXT),
    "evict": dict(_CODE_TEXT),
    "stats_reply": {"stats": (("map",), False)},
}
TYPES = sorted(KINDS)


# --- frames ------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out.replace(SURR.encode(), SURR_BYTES)


def msg(t: Any, fields: dict[Any, Any], v: Any = proto.VERSION) -> bytes:
    return pack({"t": t, "v": v, **fields})


def raw_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A map frame keeping duplicate keys (a dict cannot)."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(pack(k) + pack(v) for k, v in pairs)


def conforms(kind: tuple[Any, ...], optional: bool, x: Any) -> bool:
    """The protocol's rule for one field, written down independently."""
    if x is None:
        return optional
    k = kind[0]
    if k == "int":
        return type(x) is int and kind[1] <= x <= kind[2]
    if type(x) is str and SURR in x:
        return False
    if k == "str":
        return type(x) is str and len(x) <= kind[1]
    if k == "name":
        return type(x) is str and NAME_RE.fullmatch(x) is not None
    if k == "policy":
        return type(x) is str and x in ("block", "drop")
    if k == "balance":
        return type(x) is str and x in ("flow", "round-robin")
    if k == "slots":
        return (type(x) is list and len(x) <= proto.MAX_MEMBERS and len(set(x)) == len(x)
                and all(type(s) is int and 0 <= s <= U32 for s in x))
    if k == "bytes":
        return type(x) is bytes
    if k == "seqs":
        return (type(x) is list and 1 <= len(x) <= proto.MAX_RELEASE
                and all(type(s) is int and 0 <= s <= U64 for s in x))
    assert k == "map"
    return type(x) is dict


def rand_name(rng: random.Random, prefix: str = "") -> str:
    first = rng.choice(string.ascii_letters + string.digits)
    rest = "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(0, 20)))
    return (prefix + first + rest)[:48]


def valid_value(rng: random.Random, kind: tuple[Any, ...], optional: bool) -> Any:
    if optional and rng.random() < 0.3:
        return None
    k = kind[0]
    if k == "int":
        return rng.choice([kind[1], kind[2], rng.randint(kind[1], kind[2])])
    if k == "str":
        return rng.choice(["", "ok", "x" * kind[1], "ünïcode ✓"])
    if k == "name":
        return rand_name(rng)
    if k == "policy":
        return rng.choice(proto.POLICIES)
    if k == "balance":
        return rng.choice(proto.BALANCES)
    if k == "slots":
        return rng.sample(range(100), rng.randint(0, 4))
    if k == "bytes":
        return b""
    if k == "seqs":
        return [rng.randint(0, U64) for _ in range(rng.randint(1, 8))]
    return {"a": 1}


def valid_fields(rng: random.Random, t: str) -> dict[str, Any]:
    return {f: valid_value(rng, kind, opt) for f, (kind, opt) in KINDS[t].items()}


def bad_values(rng: random.Random, kind: tuple[Any, ...], optional: bool) -> list[Any]:
    cands: list[Any] = [1.5, float("nan"), float("inf"), b"\x00", [], [1], {"k": 1}, None,
                        True, False, "1", 7, -1, I64_MIN, U64, 1 << 63, SURR,
                        msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)]
    k = kind[0]
    if k == "int":
        lo, hi = kind[1], kind[2]
        cands += [lo - 1, rng.randint(I64_MIN, -1), str(lo), float(lo)]
        if hi < U64:
            cands += [hi + 1, rng.randint(hi + 1, U64)]
    elif k == "str":
        cands += ["x" * (kind[1] + 1), "é" * (kind[1] + 1), b"text"]
    elif k == "name":
        cands += ["", "-a", ".a", "_a", "a" * 49, "é", "aé", "a b", "a/b", "a\x00", "a\n",
                  "ß", "a" * 47 + "\u0301", b"name", "\U0001f600"]
    elif k == "policy":
        cands += ["Block", "DROP", "", "drop ", "block\x00", "lossy", b"drop"]
    elif k == "balance":
        cands += ["Flow", "roundrobin", "round_robin", "", "flow\x00", b"flow", "hash"]
    elif k == "slots":
        cands += [[-1], [1, 1], [U32 + 1], [1.5], ["1"], [None], list(range(1025)), "x"]
    elif k == "bytes":
        cands += ["x", [1]]
    elif k == "seqs":
        cands += [[-1], [1.5], [True], ["1"], [None], [[1]], [SURR], "0", {"0": 1},
                  [0] * (proto.MAX_RELEASE + 1), [U64, -1], [I64_MIN], [0, "x"]]
    else:
        cands += [[("a", 1)], "x", b"x"]
    return [c for c in cands if not conforms(kind, optional, c)]


# Generators of frames any broker must refuse, from any peer in any state.
# Each returns the frame; every one has at least one defect.


def g_random(rng: random.Random) -> bytes:
    data = rng.randbytes(rng.choice([0, 1, 2, rng.randint(1, 64), rng.randint(64, 600)]))
    if data and data[0] in MAP_HEADERS:
        data = b"\xc1" + data[1:]          # 0xc1: never used in msgpack
    return data


def g_truncated(rng: random.Random) -> bytes:
    t = rng.choice(TYPES)
    full = msg(t, valid_fields(rng, t))
    return full[: rng.randrange(len(full))]


def g_trailing(rng: random.Random) -> bytes:
    t = rng.choice(TYPES)
    return msg(t, valid_fields(rng, t)) + rng.randbytes(rng.randint(1, 8))


def g_not_a_map(rng: random.Random) -> bytes:
    t = rng.choice(TYPES)
    whole = {"t": t, "v": proto.VERSION, **valid_fields(rng, t)}
    return pack(rng.choice([
        [1, 2, 3], [whole], list(whole.items()), 7, -1, U64, I64_MIN, "hello", b"\x81",
        None, True, 1.5, [[[]]], msgpack.ExtType(1, pack(whole)), msgpack.Timestamp(0, 1),
        [{"t": "stats", "v": proto.VERSION}], "x" * rng.randint(0, 3000)]))


def g_no_type_or_version(rng: random.Random) -> bytes:
    return pack(rng.choice([
        {}, {"t": "stats"}, {"v": 1}, {"a": {"b": {"c": [1]}}}, {"T": "stats", "V": 1},
        {"t": "hello", "name": "x", "group": None, "policy": None, "credit": None, "pid": 0},
        {b"t": "stats", b"v": 1}, {"t": "stats", b"v": 1}]))


def g_version(rng: random.Random) -> bytes:
    t = rng.choice(TYPES)
    v = rng.choice([0, proto.VERSION - 1, proto.VERSION + 1, -1, 99, U64, I64_MIN,
                    str(proto.VERSION), float(proto.VERSION), True, None, [proto.VERSION],
                    {"v": proto.VERSION}, bytes([proto.VERSION]), SURR, 1 << 32])
    if rng.random() < 0.15:
        return pack({"t": t, **valid_fields(rng, t)})
    return msg(t, valid_fields(rng, t), v)


def g_unknown_type(rng: random.Random) -> bytes:
    t = rng.choice(["", "HELLO", "Hello", "launch", "hello\x00", " stats", "stats ",
                    "release\n", "x" * 5000, 1, 0, None, True, ["hello"], {"t": "hello"},
                    b"hello", b"stats", SURR, 1.5, "ハロー"])
    fields = valid_fields(rng, rng.choice(TYPES))
    if rng.random() < 0.1:
        return pack({"v": proto.VERSION, **fields})
    return msg(t, fields)


def g_missing(rng: random.Random) -> bytes:
    t = rng.choice([t for t in TYPES if KINDS[t]])
    fields = valid_fields(rng, t)
    for f in rng.sample(sorted(fields), rng.randint(1, len(fields))):
        del fields[f]
    return msg(t, fields)


def g_extra(rng: random.Random) -> bytes:
    t = rng.choice(TYPES)
    fields: dict[Any, Any] = valid_fields(rng, t)
    keys = [k for k in ["extra", "T", "V", "", "x" * 300, b"t", b"v", b"seqs", b"name", "é",
                        "name", "seqs", "pid", "stats", SURR] if k not in fields]
    fields[rng.choice(keys)] = rng.choice([None, 1, "x", [1], {"a": 1}, True])
    return msg(t, fields)


def g_bad_value(rng: random.Random) -> bytes:
    t = rng.choice([t for t in TYPES if KINDS[t]])
    fields = valid_fields(rng, t)
    f = rng.choice(sorted(fields))
    kind, opt = KINDS[t][f]
    fields[f] = rng.choice(bad_values(rng, kind, opt))
    return msg(t, fields)


def g_all_bad(rng: random.Random) -> bytes:
    t = rng.choice([t for t in TYPES if KINDS[t]])
    return msg(t, {f: rng.choice(bad_values(rng, kind, opt))
                   for f, (kind, opt) in KINDS[t].items()})


def g_bad_key(rng: random.Random) -> bytes:
    t = rng.choice(TYPES)
    key = rng.choice([1, -1, 1.5, None, True, (1, 2)])
    return pack({"t": t, "v": proto.VERSION, **valid_fields(rng, t), key: 1})


def g_duplicate_key(rng: random.Random) -> bytes:
    """The last of two equal keys wins: make that one wrong."""
    t = rng.choice(TYPES)
    pairs: list[tuple[Any, Any]] = [("t", t), ("v", proto.VERSION), *valid_fields(rng, t).items()]
    if len(pairs) > 2 and rng.random() < 0.5:
        f, _ = rng.choice(pairs[2:])
        kind, opt = KINDS[t][f]
        pairs.append((f, rng.choice(bad_values(rng, kind, opt))))
    elif rng.random() < 0.5:
        pairs.append(("t", "launch"))
    else:
        pairs.append(("v", proto.VERSION + 1))
    head = pairs[:-1]
    rng.shuffle(head)
    return raw_map([*head, pairs[-1]])


def g_deep(rng: random.Random) -> bytes:
    n = rng.randint(100, 3000)
    if rng.random() < 0.5:
        return b"\x91" * n + b"\xc0"              # [[[...nil...]]]
    return b"\x81\xa1a" * n + b"\xc0"             # {"a": {"a": ...nil...}}


def g_broker_type(rng: random.Random) -> bytes:
    t = rng.choice(sorted(set(TYPES) - FROM_PEERS))
    return msg(t, valid_fields(rng, t))


def g_huge_map(rng: random.Random) -> bytes:
    return msg("stats", {f"k{i}": i for i in range(rng.randint(500, 3000))})


def g_big(rng: random.Random) -> bytes:
    n = rng.randint(MAX_FRAME + 1, 3 * MAX_FRAME)
    if rng.random() < 0.5:
        return b"\xc1" + rng.randbytes(n - 1)
    return msg("stats", {"pad": "x" * n})


GENERATORS: list[tuple[Callable[[random.Random], bytes], int]] = [
    (g_random, 10), (g_truncated, 10), (g_trailing, 5), (g_not_a_map, 6),
    (g_no_type_or_version, 4), (g_version, 8), (g_unknown_type, 8), (g_missing, 8),
    (g_extra, 8), (g_bad_value, 22), (g_all_bad, 3), (g_bad_key, 4), (g_duplicate_key, 4),
    (g_deep, 3), (g_broker_type, 6), (g_huge_map, 1), (g_big, 1),
]


def garbage(rng: random.Random) -> tuple[bytes, str]:
    gen = rng.choices([g for g, _ in GENERATORS], [w for _, w in GENERATORS])[0]
    return gen(rng), gen.__name__[2:]


def multipart(rng: random.Random) -> list[bytes]:
    """Two to five frames in one message: refused whatever they hold."""
    return [rng.choice([garbage(rng)[0], msg("stats", {}), msg("heartbeat", {}), b"",
                        msg("hello", {"name": rand_name(rng), "group": None, "policy": "drop",
                                      "credit": 1, "pid": 0})])
            for _ in range(rng.randint(2, 5))]


def hello_frame(name: str, *, policy: str | None = "drop", credit: int | None = 1,
                pid: int = 0, group: str | None = None) -> bytes:
    return msg("hello", {"name": name, "group": group, "policy": policy, "credit": credit,
                         "pid": pid, "balance": None})


def release_frame(seqs: list[int]) -> bytes:
    return msg("release", {"seqs": seqs})


# --- raw peers ---------------------------------------------------------------------


class Peer:
    """A raw socket to the broker, and the replies it is owed.

    `lo`..`hi` ERRORs are owed for the frames sent since the last fence;
    `definite` counts the frames that had to be refused, over the peer's life."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, label: str,
                 alive: Callable[[str], None], seed: int, kind: int = zmq.DEALER) -> None:
        self.label = label
        # Its own generator for what depends on the batches it got (timing),
        # so that the main generator's sequence is the same on every run.
        self.rng = random.Random(seed)
        self.kind = kind
        self.alive = alive
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))
        if kind == zmq.ROUTER:
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, b"broker")
        self.sock.connect(endpoint)
        self.name: str | None = None        # attached under this name
        self.held: list[int] = []           # seqs of batches received, not given back
        self.given: list[int] = []          # seqs given back
        self.lo = self.hi = 0
        self.errors = 0                     # ERRORs received since the last fence
        self.owed_stats = self.got_stats = 0
        self.sent: list[str] = []           # what was sent since the last fence
        self.replies: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.definite = 0
        self.frames = 0
        self.closed = False
        if kind == zmq.ROUTER:
            self._router_ready()

    def _router_ready(self) -> None:
        """A ROUTER can only send once the connection is up (ROUTER_MANDATORY)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.sock.send_multipart([b"broker", msg("stats", {})])
                break
            except zmq.ZMQError as e:
                assert e.errno == zmq.EHOSTUNREACH and time.monotonic() < deadline, e
                time.sleep(0.005)
        self.owed_stats += 1
        self.sent.append("stats")
        self.fence()

    def send(self, parts: bytes | list[bytes], what: str, lo: int = 1, hi: int | None = None,
             stats: int = 0) -> None:
        parts = [parts] if isinstance(parts, bytes) else parts
        if self.kind == zmq.ROUTER:
            parts = [b"broker", *parts]
        try:
            self.sock.send_multipart(parts)
        except zmq.ZMQError as e:
            self.alive(f"{self.label} sending {what}")
            raise AssertionError(f"{self.label}: cannot send {what}: {e}") from None
        self.lo += lo
        self.hi += lo if hi is None else hi
        self.definite += lo
        self.owed_stats += stats
        self.frames += 1
        self.sent.append(what)

    def recv(self, timeout: float) -> bool:
        """Takes one reply within `timeout` s; False if none came."""
        deadline = time.monotonic() + timeout
        while not self.sock.poll(int(max(0.0, min(0.1, deadline - time.monotonic())) * 1000)):
            if time.monotonic() >= deadline:
                return False
            self.alive(f"{self.label} waiting after {self.sent[-3:]}")
        parts = self.sock.recv_multipart()
        if self.kind == zmq.ROUTER:
            assert parts[0] == b"broker", parts[:1]
            parts = parts[1:]
        assert len(parts) == 1, f"{self.label}: a reply of {len(parts)} frames"
        self._take(parts[0])
        return True

    def _take(self, frame: bytes) -> None:
        try:
            m = msgpack.unpackb(frame, raw=False)
        except Exception as e:
            raise AssertionError(f"{self.label}: undecodable reply {frame[:80]!r}: {e}") from e
        assert type(m) is dict and m.get("t") in BROKER_TYPES, f"{self.label}: reply {m!r:.200}"
        t, f = proto.decode(frame, proto.MAX_BROKER_FRAME)    # every field as specified
        self.replies[t] += 1
        if t == "error":
            self.errors += 1
            self.codes[f["code"]] += 1
            assert f["code"] in ERROR_CODES, f"{self.label}: ERROR {f}"
        elif t == "stats_reply":
            self.got_stats += 1
        elif t == "batch" and self.name is not None:
            self.held.append(f["seq"])
        elif t == "evict":
            self.name = None
            self.held.clear()

    def drain(self) -> None:
        while self.recv(0):
            pass

    def fence(self) -> None:
        """STATS, then every reply owed up to it; checks the ERROR count."""
        self.send(msg("stats", {}), "fence", lo=0, stats=1)
        while self.got_stats < self.owed_stats:
            assert self.recv(WAIT), (f"{self.label}: no reply within {WAIT:g} s; owed "
                                     f"{self.owed_stats - self.got_stats} STATS replies after "
                                     f"{Counter(self.sent)}")
        assert self.lo <= self.errors <= self.hi, (
            f"{self.label}: {self.errors} ERROR replies, owed {self.lo}..{self.hi}, "
            f"for {Counter(self.sent)}; codes so far {dict(self.codes)}")
        self.lo = self.hi = self.errors = 0
        self.owed_stats = self.got_stats = 0
        self.sent.clear()

    def hello(self, name: str, expect: str, code: str | None = None, **kw: Any) -> None:
        """HELLO, and its answer: "welcome" or "error" (with `code`)."""
        self.fence()
        welcomed = self.replies["welcome"]
        frame = hello_frame(name, **kw)
        what = f"HELLO name={name!r} {kw}"
        self.send(frame, what, lo=int(expect == "error"))
        before = dict(self.codes)
        while self.replies["welcome"] == welcomed and self.errors == 0:
            assert self.recv(WAIT), f"{self.label}: no answer to {what}"
        got = "welcome" if self.replies["welcome"] > welcomed else "error"
        new_codes = Counter(self.codes)
        new_codes.subtract(before)
        assert got == expect, f"{self.label}: {what} answered {got} {+new_codes}, not {expect}"
        if code is not None:
            assert new_codes[code] == 1, f"{self.label}: {what} refused with {+new_codes}"
        if got == "welcome":
            self.name = name
        self.errors = self.lo = self.hi = 0
        self.sent.clear()

    def release(self, seqs: list[int], what: str, lo: int, hi: int | None = None) -> None:
        self.send(release_frame(seqs), what, lo, hi)
        for s in seqs:
            if s in self.held:
                self.held.remove(s)
                self.given.append(s)

    def unheld(self) -> int:
        """A seq this peer surely does not hold."""
        rng = self.rng
        if self.given and rng.random() < 0.6:
            return rng.choice(self.given)
        return rng.choice([U64, 1 << 40, rng.randint(1 << 40, U64)])

    def misbehave(self, keep: int) -> None:
        """One misuse of RELEASE by an attached peer. The first `keep` batches
        it holds are never given back."""
        rng = self.rng
        free = self.held[keep:]
        r = rng.random()
        if free and r < 0.3:
            s = rng.choice(free)
            self.release([s], "release held", 0)
            self.release([s], "release again", 1)
        elif free and r < 0.45:
            s = rng.choice(free)
            self.release([s, s], "release held twice in one", 0, 1)
        elif free and r < 0.6:
            self.release([rng.choice(free), self.unheld()], "release held+unheld", 1)
        elif free and r < 0.7:
            self.release([rng.choice(free)], "release held", 0)
        elif r < 0.85:
            self.release([self.unheld()], "release unheld", 1)
        elif r < 0.95:
            base = rng.randint(1 << 40, 1 << 50)
            self.release(list(range(base, base + proto.MAX_RELEASE)), "release 4096 unheld", 1)
        else:
            self.send(release_frame([0] * (proto.MAX_RELEASE + 1)), "release 4097", 1)

    def close(self) -> None:
        self.closed = True
        self.sock.close(linger=0)


# --- the test ----------------------------------------------------------------------


def test_hostile_control_traffic(broker) -> None:
    rng = random.Random(SEED)
    want = read_pcap(str(CAPTURE)).packets * LOOPS
    # Every frame is answered here: no peer is held to a budget of messages.
    b = broker("-r", str(CAPTURE), "--loop", str(LOOPS), "--wait-clients", "2",
               "--slab-size", "8k", "--slabs", "32", "--control-rate", "1e9")
    endpoint = f"ipc://{b.socket}"
    t0 = time.monotonic()

    def alive(after: str) -> None:
        if b.proc.poll() is not None:
            raise AssertionError(f"broker exited {b.proc.returncode} during {after} "
                                 f"(seed {SEED}); its stderr:\n{b.stderr()}")
        assert time.monotonic() - t0 < BUDGET, f"out of time during {after}"

    ctx: zmq.Context[Any] = zmq.Context()
    peers: list[Peer] = []
    unobserved = 0          # refusals whose ERROR nobody can read (REQ, sockets gone)
    fresh_names = (f"f{i}-" for i in range(1000))

    def peer(label: str, kind: int = zmq.DEALER) -> Peer:
        p = Peer(ctx, endpoint, label, alive, rng.getrandbits(64), kind)
        peers.append(p)
        return p

    def chunk(p: Peer, n: int, extra: Callable[[], None] | None = None,
              p_extra: float = 0.0) -> None:
        for _ in range(n):
            r = rng.random()
            if r < p_extra and extra is not None:
                extra()
            elif r < p_extra + 0.06:
                p.send(msg("stats", {}), "stats", lo=0, stats=1)
            elif r < p_extra + 0.10:
                p.send(multipart(rng), "multipart")
            else:
                frame, what = garbage(rng)
                p.send(frame, what)
        p.fence()

    try:
        with pktipc.connect(b.name, "good", timeout=WAIT) as good:
            base = good.stats().counters.protocol_errors
            B = peer("B")          # attaches as the second client: starts the stream
            C = peer("C")          # attaches and leaves, under many names
            R = peer("R", zmq.ROUTER)

            # Before the stream starts: nobody attached but the good client.
            chunk(B, 40)
            chunk(C, 40)
            C.hello("good", "error", code="name-taken", policy=None, credit=None)
            B.hello("b-hostile", "welcome", credit=2, group="hostiles")
            B.hello("b-hostile-again", "error", code="unexpected")
            chunk(B, 20)

            got: list[tuple[int, int, int, bytes]] = []
            seqs: list[int] = []
            ended = False

            def consume(timeout: float) -> None:
                nonlocal ended
                try:
                    batch = good.next_batch(timeout=timeout)
                except pktipc.EndOfStream:
                    ended = True
                    return
                if batch is not None:
                    with batch:
                        for p in batch.packets():
                            got.append((p.ts_ns, p.caplen, p.wirelen, bytes(p.data)))
                            seqs.append(p.seq)

            def b_extra() -> None:
                r = rng.random()
                if r < 0.6:
                    B.misbehave(keep=1)       # the first batch B gets, it never gives back
                elif r < 0.85:
                    B.send(msg("heartbeat", {}), "heartbeat", lo=0)
                else:
                    B.send(hello_frame(rand_name(rng)), "hello while attached")

            def c_extra() -> None:
                r = rng.random()
                if C.name is not None:
                    if r < 0.6:
                        C.misbehave(keep=0)
                    else:
                        C.send(msg("heartbeat", {}), "heartbeat", lo=0)
                elif r < 0.3:
                    C.send(msg("heartbeat", {}), "heartbeat unattached")
                elif r < 0.6:
                    C.send(release_frame([rng.randint(0, U64)]), "release unattached")
                else:
                    C.send(msg("bye", {}), "bye unattached", lo=0)

            def step_c() -> None:
                if C.name is None and rng.random() < 0.35:
                    r = rng.random()
                    if r < 0.2:
                        C.hello("good", "error", code="name-taken")
                    elif r < 0.3:
                        C.hello("b-hostile", "error", code="name-taken")
                    else:
                        C.hello(rand_name(rng, f"c{step}-"), "welcome",
                                credit=rng.randint(1, 3),
                                pid=rng.choice([0, os.getpid(), b.pid]),
                                group=rng.choice([None, rand_name(rng)]))
                chunk(C, rng.randint(20, 50), c_extra, 0.25)
                if C.name is not None and rng.random() < 0.2:
                    C.send(msg("bye", {}), "bye", lo=0)
                    C.name = None
                    C.held.clear()
                    C.fence()

            def step_fresh(k: int) -> None:
                nonlocal unobserved
                kind = k % 4
                if kind == 1:              # sends and goes: nobody reads the ERRORs
                    s = ctx.socket(zmq.DEALER)
                    s.connect(endpoint)
                    n = rng.randint(10, 30)
                    for _ in range(n):
                        s.send(garbage(rng)[0])
                    s.close(linger=2000)
                    unobserved += n
                    return
                f = peer(f"F{k}")
                if kind == 2:              # attaches, misbehaves, vanishes without BYE
                    f.hello(rand_name(rng, next(fresh_names)), "welcome", credit=1,
                            pid=rng.choice([0, os.getpid(), rng.randint(1, 1 << 22)]))
                    f.recv(0.05)
                    f.release([f.unheld()], "release unheld", 1)
                elif kind == 3:            # steals names
                    f.hello("good", "error", code="name-taken")
                    f.hello("b-hostile", "error", code="name-taken")
                chunk(f, rng.randint(10, 30))
                f.close()

            step = 0
            fresh = 0
            overlap = 0
            while step < STEPS or not ended:
                alive(f"step {step}")
                if not ended:
                    consume(0.002 if step < STEPS else WAIT)
                if step >= STEPS:
                    continue
                if not ended:
                    overlap = step + 1       # steps taken while the stream was flowing
                r = rng.random()
                if step % 11 == 5:
                    step_fresh(fresh)
                    fresh += 1
                elif r < 0.40:
                    B.drain()
                    chunk(B, rng.randint(20, 50), b_extra, 0.3)
                elif r < 0.70:
                    step_c()
                elif r < 0.82:
                    for _ in range(rng.randint(10, 30)):
                        if rng.random() < 0.7:
                            R.send(multipart(rng), "multipart")
                        else:
                            R.send(garbage(rng)[0], "garbage")
                    R.fence()
                elif r < 0.90:
                    # REQ puts an empty delimiter frame first: 2+ frames, refused;
                    # the ERROR (no delimiter) never reaches the REQ's reader. One
                    # socket per request: a REQ sends once before it must read.
                    for _ in range(rng.randint(2, 6)):
                        q = ctx.socket(zmq.REQ)
                        q.connect(endpoint)
                        q.send_multipart(rng.choice([[garbage(rng)[0]], [msg("stats", {})],
                                                     multipart(rng)]))
                        q.close(linger=2000)
                        unobserved += 1
                elif r < 0.95:
                    p = rng.choice([B, C, R])
                    for _ in range(rng.randint(100, 300)):
                        p.send(msg("stats", {}), "stats flood", lo=0, stats=1)
                    p.fence()
                else:
                    p = rng.choice([B, C])
                    for _ in range(rng.randint(1, 3)):
                        p.send(g_big(rng), "too large")
                    p.send(b"\xc1" + rng.randbytes(ZMQ_MAX - 1), "1 MiB")
                    p.fence()
                step += 1

            # Everything, byte-exact and in order, despite all that.
            assert len(got) == len(want), (
                f"the good client got {len(got)} of {len(want)} packets, then end-of-stream "
                f"({good.end_error!r}); broker: {good.stats()}")
            assert got == [(p.ts_ns, p.caplen, p.wirelen, p.data) for p in want]
            assert seqs == list(range(len(want)))
            assert good.gaps == [] and good.end_error is None
            # The hostile traffic really was interleaved with the stream.
            assert overlap >= STEPS // 2, overlap

            # Boundaries, the good client done but the broker still serving B.
            alive("boundaries")
            B.drain()
            B.release([U64], "release U64", 1)
            B.release([], "release nothing", 1)
            B.send(release_frame([0] * (proto.MAX_RELEASE + 1)), "release 4097", 1)
            B.release(list(range(1 << 40, (1 << 40) + proto.MAX_RELEASE)), "release 4096", 1)
            pad = msg("stats", {"pad": ""})
            exact = msg("stats", {"pad": "x" * (MAX_FRAME - len(pad) - 2)})
            assert len(exact) == MAX_FRAME, len(exact)
            C.send(exact, "MAX_FRAME bytes", 1)
            C.send(exact + b"\x00", "MAX_FRAME+1 bytes", 1)
            C.send(b"\xc1" * ZMQ_MAX, "1 MiB", 1)
            B.fence()
            C.fence()
            # Over ZMQ_MAXMSGSIZE the transport drops the connection: no reply,
            # and nothing counted, but the broker carries on.
            f = peer("F-over")
            f.send(b"\xc1" * (ZMQ_MAX + 1), "1 MiB + 1", lo=0)
            assert not f.recv(0.3)
            f.close()
            f = peer("F-after")
            f.fence()
            f.close()
            good_pid = os.getpid()
            boundaries: list[tuple[dict[str, Any], str]] = [
                ({"name": "n" * 48}, "welcome"),
                ({"name": "n" * 49}, "error"),
                ({"credit": proto.MAX_CREDIT}, "welcome"),
                ({"credit": proto.MAX_CREDIT + 1}, "error"),
                ({"credit": 0}, "error"),
                ({"policy": None, "credit": None}, "welcome"),
                ({"pid": good_pid}, "welcome"),
                ({"pid": 1}, "welcome"),
                ({"pid": (1 << 31) - 1}, "welcome"),
                ({"pid": U32 + 1}, "error"),
                ({"pid": -1}, "error"),
                # Valid pid fields beyond pid_t: no such process, nothing to watch
                # (os.pidfd_open raises OverflowError, not OSError, for these).
                ({"pid": 1 << 31}, "welcome"),
                ({"pid": U32}, "welcome"),
            ]
            for i, (kw, expect) in enumerate(boundaries):
                f = peer(f"H{i}")
                name = kw.pop("name", f"edge-{i}")
                kw.setdefault("policy", "drop")
                kw.setdefault("credit", 1)
                f.hello(name, expect, code="bad-field" if expect == "error" else None, **kw)
                if f.name is not None:
                    f.send(msg("bye", {}), "bye", lo=0)
                chunk(f, 5)
                f.close()
                alive(f"HELLO {name} {kw}")

            # Every refusal counted: at least one per malformed frame, and
            # exactly the ERRORs sent (read here or not).
            definite = sum(p.definite for p in peers) + unobserved
            observed = sum(p.replies["error"] for p in peers)
            deadline = time.monotonic() + WAIT
            while True:
                stats = good.stats()
                delta = stats.counters.protocol_errors - base
                if delta >= observed + unobserved or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            frames = sum(p.frames for p in peers) + unobserved
            assert delta >= definite > 3000, (delta, definite, frames)
            assert delta == observed + unobserved, (delta, observed, unobserved)
            names = {c.name for c in stats.clients}
            assert "good" in names and "b-hostile" in names
            alive("the end")

            for p in (B, C):
                if p.name is not None:
                    p.send(msg("bye", {}), "bye", lo=0)
            for p in peers:
                if not p.closed:
                    p.drain()
                assert p.replies["welcome"] <= 1 or p is C, p.label
            assert B.replies["evict"] == 0 and C.replies["evict"] == 0
            assert B.replies["batch"] >= 1
    finally:
        for p in peers:
            p.close()
        ctx.term()
    assert b.wait(timeout=15) == 0
    err = b.stderr()
    assert "Traceback" not in err, err
    assert time.monotonic() - t0 < BUDGET
