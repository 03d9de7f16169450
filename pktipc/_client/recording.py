"""Named rolling recordings (`pktipc record`): a process of their own that
outlives whoever started it, by name, under the broker's quota.

A recording NAME of broker B is a recorder process: a client of B named
rec.NAME (so that B counts it against its --max-recordings), writing a
rolling set of pcapng files NAME_<number>_<UTC time>.pcapng in a directory,
the oldest removed to keep the set within its bound. Its state lives in B's
runtime directory, in B.recordings/ (private to the user): NAME.json (what
`record list` shows and `record attach` follows, rewritten whole, by
rename), NAME.lock (flocked by the recorder for as long as it runs, holding
its pid) and NAME.log. Nothing there is opened through a link, and nothing
is trusted that another user could have made.

Started without --detach, the recorder ends when its starter does (it
watches it through a pidfd) and its entry goes with it; detached, it runs
until `record stop`, and its entry stays, stopped or failed, until then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from .. import _protocol as proto
from .._errors import BrokerGone, BrokerNotRunning, EndOfStream, PktipcError
from .._paths import RECORDING_PREFIX, check_name, check_recording_name, runtime_dir
from . import pcapng
from .client import Client, broker_stats, connect
from .writer import CaptureFilter, ClientTally, FileInfo, RollingWriter, WriteFailed

STATE_SUFFIX = ".recordings"
DEFAULT_MAX_SIZE = 100 * 1000 * 1000
DEFAULT_FILES = 10
MIN_MAX_SIZE = 4096
SAVE_EVERY = 0.5            # seconds between state updates while it runs
POLL = 0.25                 # the recorder's longest wait for a batch
_LIVE = ("starting", "running", "waiting")      # states of a recorder that runs


@dataclass
class Spec:
    """What `record start` asks for; the recorder process gets it as JSON."""

    name: str
    server: str
    dir: str
    max_size: int | None = None     # bytes a file holds at most
    files: int | None = None        # files kept at most
    max_age: float | None = None    # seconds kept
    group: str | None = None
    policy: str | None = None
    filter: str = ""
    detached: bool = False
    starter: int = 0                # pid the recording ends with (not detached)
    timeout: float = 5.0

    def check(self) -> None:
        check_recording_name(self.name)
        check_name("broker", self.server)
        if self.group is not None:
            check_name("group", self.group)
        if self.policy is not None and self.policy not in proto.POLICIES:
            raise ValueError(f"policy must be one of {', '.join(proto.POLICIES)}")
        if self.max_size is not None and self.max_size < MIN_MAX_SIZE:
            raise ValueError(f"--max-size must be at least {MIN_MAX_SIZE} bytes")
        if self.files is not None and self.files < 1:
            raise ValueError("--files must be at least 1")
        if self.max_age is not None and not (math.isfinite(self.max_age) and self.max_age > 0):
            raise ValueError("--max-age must be a positive number of seconds")
        d = Path(self.dir)
        if not d.is_dir():
            raise ValueError(f"-w {self.dir}: not a directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ValueError(f"-w {self.dir}: permission denied")

    @property
    def rotate_size(self) -> int | None:
        if self.max_size is None and self.max_age is None:
            return DEFAULT_MAX_SIZE
        return self.max_size

    @property
    def keep_files(self) -> int | None:
        """Files kept at most: --files, or the default unless --max-age bounds the set."""
        if self.files is not None:
            return self.files
        return None if self.max_age is not None else DEFAULT_FILES

    @property
    def file_age(self) -> float | None:
        """--max-age: each file spans a tenth of it (or 1/--files)."""
        if self.max_age is None:
            return None
        return self.max_age / (self.files or DEFAULT_FILES)

    def bound(self) -> str:
        parts = []
        if self.keep_files is not None:
            size = self.rotate_size
            parts.append(f"{self.keep_files} files" + (f" of {size:,} bytes" if size else ""))
        elif self.rotate_size is not None:
            parts.append(f"files of {self.rotate_size:,} bytes")
        if self.max_age is not None:
            parts.append(f"{self.max_age:g} s")
        return " and ".join(parts)


def _who(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def _ns_text(ns: int | None) -> str:
    if ns is None:
        return "-"
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S")


class StateDir:
    """B.recordings/ in the runtime directory, opened without following a
    link and checked: the runtime directory ours or root's (or anyone's, to
    root) and writable by nobody else; ours private (0700, ours)."""

    def __init__(self, server: str, *, create: bool) -> None:
        self.server = server
        self.rdir = runtime_dir()
        self.path = self.rdir / f"{server}{STATE_SUFFIX}"
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        me = os.geteuid()
        try:
            rfd = os.open(self.rdir, flags)
        except FileNotFoundError:
            raise PktipcError(f"no runtime directory {self.rdir}: is broker {server!r} "
                              "running?") from None
        except OSError as e:
            raise PktipcError(f"runtime directory {self.rdir}: {e.strerror}") from None
        try:
            st = os.fstat(rfd)
            if (st.st_uid not in (me, 0) and me != 0) or st.st_mode & 0o022:
                raise PktipcError(f"runtime directory {self.rdir} is not one a broker makes "
                                  "(ours or root's, writable by nobody else): refused")
            if create:
                try:
                    os.mkdir(self.path.name, 0o700, dir_fd=rfd)
                except FileExistsError:
                    pass
                except PermissionError:
                    raise PktipcError(f"{self.rdir}: permission denied: recordings keep their "
                                      f"state there; run as the broker's user") from None
            try:
                self.fd = os.open(self.path.name, flags, dir_fd=rfd)
            except FileNotFoundError:
                raise
            except OSError as e:
                raise PktipcError(f"{self.path}: {e.strerror} (a link or another kind of "
                                  "file there is refused: remove it)") from None
        finally:
            os.close(rfd)
        st = os.fstat(self.fd)
        if st.st_uid != me or stat.S_IMODE(st.st_mode) & 0o077:
            os.close(self.fd)
            raise PktipcError(f"{self.path} is not a private directory of {_who(me)}: "
                              "remove it")

    @classmethod
    def every(cls, server: str | None = None) -> Iterator[StateDir]:
        """The state directories of every broker (or of `server`) that has one."""
        rdir = runtime_dir()
        servers = [server] if server else sorted(
            p.name[: -len(STATE_SUFFIX)] for p in (rdir.glob(f"*{STATE_SUFFIX}")
                                                   if rdir.is_dir() else ()))
        for s in servers:
            try:
                yield cls(s, create=False)
            except FileNotFoundError:
                continue

    def close(self) -> None:
        os.close(self.fd)

    def names(self) -> list[str]:
        return sorted(n[:-5] for n in os.listdir(self.fd) if n.endswith(".json")
                      and not n.startswith("."))

    def _open(self, name: str, flags: int, mode: int = 0o600) -> int:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                     dir_fd=self.fd)
        st = os.fstat(fd)
        # No link count but 1 is a link (another name for a file elsewhere),
        # but 0: the file was replaced since it was opened (write() renames
        # a new NAME.json over it), and what it holds is still whole.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink > 1:
            os.close(fd)
            raise PktipcError(f"{self.path / name} is not a plain file of "
                              f"{_who(os.geteuid())}: remove it")
        return fd

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            fd = self._open(f"{name}.json", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                data: dict[str, Any] = json.load(f)
            return data
        except ValueError:
            return None

    def write(self, name: str, state: dict[str, Any]) -> None:
        tmp = f".{name}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, f"{name}.json", src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def lock(self, name: str) -> int:
        """Takes NAME.lock (the recording runs as long as its recorder holds
        it) and writes our pid in it; PktipcError if another holds it."""
        for _ in range(10):
            fd = self._open(f"{name}.lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if self.running(name):
                    raise PktipcError(f"recording {name!r} of broker {self.server!r} is "
                                      "already running") from None
                time.sleep(0.02)        # someone was only looking
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        raise PktipcError(f"recording {name!r}: its lock is busy")

    def running(self, name: str) -> int | None:
        """The pid of NAME's recorder if it runs (holds the lock), else None."""
        try:
            fd = self._open(f"{name}.lock", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            return None
        finally:
            os.close(fd)

    def log(self, name: str) -> int:
        return self._open(f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def remove(self, name: str) -> None:
        for suffix in (".json", ".lock", ".log"):
            try:
                os.unlink(f"{name}{suffix}", dir_fd=self.fd)
            except FileNotFoundError:
                pass


def _find(name: str, server: str | None) -> StateDir:
    """The state directory of the broker whose recording NAME is."""
    check_recording_name(name)
    found = []
    for sd in StateDir.every(server):
        if sd.read(name) is not None:
            found.append(sd)
        else:
            sd.close()
    if not found:
        where = f" of broker {server!r}" if server else ""
        raise PktipcError(f"no recording named {name!r}{where} (see pktipc record list)")
    if len(found) > 1:
        for sd in found:
            sd.close()
        raise PktipcError(f"recordings named {name!r} run on brokers "
                          f"{', '.join(sd.server for sd in found)}: say which with --server")
    return found[0]


# -- the recorder process ------------------------------------------------------


@dataclass
class _Drops:
    """The kernel's and the broker's drops since the recording started,
    across broker restarts (each broker counts from 0)."""

    kernel: int = 0
    broker: int = 0
    epoch: int = 0
    _base: tuple[int, int] = (0, 0)     # the counters when this epoch was first seen
    _before: tuple[int, int] = (0, 0)   # counted under earlier epochs

    def update(self, counters: dict[str, Any]) -> None:
        kernel = sum(s["kernel_drops"] for s in counters["sources"] if s["live"])
        broker = counters["broker"]["broker_drops"]
        if counters["epoch"] != self.epoch:
            self.epoch, self._base = counters["epoch"], (kernel, broker)
            self._before = (self.kernel, self.broker)
        self.kernel = self._before[0] + kernel - self._base[0]
        self.broker = self._before[1] + broker - self._base[1]


@dataclass
class Recorder:
    spec: Spec
    sd: StateDir
    log: TextIO
    state: dict[str, Any] = field(default_factory=dict)
    stop_why: str | None = None

    def say(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} pktipc: recording {self.spec.name!r}: {text}", file=self.log,
              flush=True)

    # -- files --
    def _open_dir(self) -> None:
        self.dirfd = os.open(self.spec.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        prefix = f"{self.spec.name}_"
        numbers = [int(n[len(prefix):].split("_", 1)[0]) for n in os.listdir(self.dirfd)
                   if n.startswith(prefix) and n[len(prefix):].split("_", 1)[0].isdigit()]
        self.first_number = max(numbers, default=0)

    def _check_dir(self) -> None:
        """A directory that disappeared (or was replaced) stops the recording."""
        st = os.fstat(self.dirfd)
        try:
            now = os.stat(self.spec.dir)
            same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
        except OSError:
            same = False
        if st.st_nlink == 0 or not same:
            raise WriteFailed(f"directory {self.spec.dir} was removed")

    def _open_file(self, number: int, now_ns: int) -> tuple[BinaryIO, str]:
        stamp = datetime.fromtimestamp(now_ns / 1e9, UTC).strftime("%Y%m%dT%H%M%SZ")
        n = self.first_number + number
        while True:
            name = f"{self.spec.name}_{n:05d}_{stamp}.pcapng"
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=self.dirfd)
            except FileExistsError:
                self.first_number += 1
                n += 1
                continue
            except OSError as e:
                e.filename = str(Path(self.spec.dir) / name)
                raise
            return open(fd, "wb", buffering=0), name

    def _opened(self, info: FileInfo) -> None:
        self.tally.opened(info)
        self.kept.append(info)
        self._retain(info.opened_ns)
        self.save()

    def _retain(self, now_ns: int) -> None:
        """Removes the oldest files beyond the bound (never the current one)."""
        keep, age = self.spec.keep_files, self.spec.max_age
        while self.kept:
            f = self.kept[0]
            if f.closed_ns is None:
                break
            too_many = keep is not None and len(self.kept) > keep
            too_old = age is not None and f.closed_ns < now_ns - age * 1e9
            if not (too_many or too_old):
                break
            try:
                os.unlink(f.name, dir_fd=self.dirfd)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.say(f"cannot remove {f.name}: {e.strerror}")
            self.kept.pop(0)
            r = self.state["removed"]
            r["files"] += 1
            r["packets"] += f.packets
            r["bytes"] += f.size

    # -- state --
    def save(self) -> None:
        st = self.state
        self.rw.sync()
        st["files"] = [asdict(f) for f in self.kept]
        st["packets"] = self.rw.packets
        st["bytes"] = self.rw.data_bytes
        st["drops"] = {"kernel": self.drops.kernel, "broker": self.drops.broker,
                       "recording": self.tally.own_drops}
        st["restarts"] = self.restarts
        st["updated_ns"] = time.time_ns()
        self.sd.write(self.spec.name, st)
        self.next_save = time.monotonic() + SAVE_EVERY

    # -- the loop --
    def _connect(self, timeout: float) -> Client:
        s = self.spec
        return connect(s.server, RECORDING_PREFIX + s.name, group=s.group, policy=s.policy,
                       timeout=timeout, reconnect=math.inf)

    def _signal(self, signum: int, frame: Any) -> None:
        self.stop_why = "stopped"

    def run(self, ready: BinaryIO) -> int:
        s = self.spec
        self.state = {"name": s.name, "server": s.server, "dir": s.dir, "pid": os.getpid(),
                      "detached": s.detached, "state": "starting", "why": None,
                      "started_ns": time.time_ns(), "options": asdict(s),
                      "removed": {"files": 0, "packets": 0, "bytes": 0}}
        self.kept: list[FileInfo] = []
        self.restarts = 0
        self.drops = _Drops()
        self.filter = CaptureFilter(s.filter) if s.filter else None
        try:
            self._open_dir()
            self.client = self._connect(s.timeout)
        except (PktipcError, ValueError, OSError) as e:
            self.sd.remove(s.name)
            _tell(ready, f"error: {e}")
            return 1
        self.tally = ClientTally(self.client, who="recording")
        self.rw = RollingWriter(
            self._open_file, self.client.ifaces, "pcapng", max_size=s.rotate_size,
            max_age=s.file_age, comment=f"pktipc recording {s.name!r} of broker {s.server!r}",
            statistics=self.tally.statistics, opened=self._opened)
        starter = _pidfd(s.starter) if s.starter else None
        started = False
        status, why = 1, "failed"
        try:
            if self.filter is not None:
                self.filter.check(sorted({i.linktype for i in self.client.ifaces}))
            self.rw.start()
            self.state["state"] = "running"
            self.drops.update(self.client.segment_counters())
            self.save()
            started = True
            _tell(ready, f"ok {os.getpid()} {self.kept[0].name}")
            self.say(f"started (pid {os.getpid()}): broker {s.server!r}, {s.dir}, "
                     f"{s.bound()}")
            status, why = 0, self._loop(starter)
        except (PktipcError, ValueError, OSError) as e:
            why = f"failed: {e}"
        finally:
            try:
                self.rw.close()
            except WriteFailed as e:
                if status == 0:
                    status, why = 1, f"failed: {e}"
            self.client.close()
            if starter is not None:
                os.close(starter)
        for f in [f for f in self.kept if f.size == 0]:    # not even a header: no file
            with contextlib.suppress(OSError):
                os.unlink(f.name, dir_fd=self.dirfd)
            self.kept.remove(f)
        if not started:
            self.sd.remove(s.name)
            _tell(ready, f"error: {why.removeprefix('failed: ')}")
            return 1
        self.say(why)
        state, _, self.state["why"] = why.partition(": ")
        self.state["state"] = state
        if s.detached:
            self.save()
        else:
            self.sd.remove(s.name)
            _tell(ready, why)
        return status

    def _loop(self, starter: int | None) -> str:
        """Records until told to stop; how it ended ("stopped: ...", ...)."""
        seen = self.client.reconnects
        while True:
            if self.stop_why is not None:
                return self.stop_why
            if starter is not None and select.select([starter], [], [], 0)[0]:
                return "stopped: the command that started it ended"
            try:
                batch = self.client.next_batch(timeout=POLL)
            except EndOfStream:
                if self.client.end_error is None:
                    return "ended: the broker's stream ended"
                if not self._wait_broker(f"the broker's stream ended early "
                                         f"({self.client.end_error})", starter):
                    return self.stop_why or "stopped"
                seen, batch = self.client.reconnects, None
            if self.client.reconnects != seen:
                seen = self.client.reconnects
                self._restarted("the broker stopped answering")
            if batch is not None:
                with batch:
                    desc, slab, idx = batch.descriptors, batch.buffer(), batch.mine
                    if self.filter is not None:
                        idx = self.filter.select(desc, slab, idx)
                    self.rw.write(desc, slab, idx)
                self.tally.seen()
            if time.monotonic() >= self.next_save:
                self._check_dir()
                self.rw.tick()
                self._retain(time.time_ns())
                self.drops.update(self.client.segment_counters())
                self.save()

    def _restarted(self, why: str) -> None:
        """Attached to a new broker: the file ends, noting it, and the next
        names the new broker's sources."""
        self.restarts += 1
        self.say(f"{why}; attached to the broker that took its place")
        self.rw.ifaces = self.client.ifaces
        self.rw.rotate()

    def _wait_broker(self, why: str, starter: int | None) -> bool:
        """The stream ended early (the broker was stopped): waits for a
        broker of the same name and attaches to it. False if told to stop
        meanwhile."""
        self.say(f"{why}; waiting for the broker to come back")
        self.state["state"] = "waiting"
        self.save()
        self.client.close()
        delay = 0.05
        while self.stop_why is None:
            if starter is not None and select.select([starter], [], [], 0)[0]:
                self.stop_why = "stopped: the command that started it ended"
                break
            try:
                client = self._connect(1.0)
            except (BrokerNotRunning, BrokerGone):
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            self.client = self.tally.client = client
            self.state["state"] = "running"
            self._restarted("the broker was stopped")
            return True
        return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return os.open("/dev/null", os.O_RDONLY)     # already gone: readable at once


def _tell(ready: BinaryIO, line: str) -> None:
    try:
        ready.write(line.replace("\n", " ").encode() + b"\n")
        ready.flush()
    except OSError:
        pass            # the starter is gone


def recorder_main() -> int:
    """The recorder process: its Spec as JSON on stdin; "ok PID FILE" or
    "error: ..." on stdout once started, and (not detached) how it ended."""
    spec = Spec(**json.loads(sys.stdin.read()))
    os.chdir("/")                   # every path it has is absolute: it keeps no mount busy
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    ready = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                   # stdout into the log too
    try:
        sd = StateDir(spec.server, create=True)
        lock = sd.lock(spec.name)
    except PktipcError as e:
        _tell(ready, f"error: {e}")
        return 1
    rec = Recorder(spec, sd, sys.stderr)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, rec._signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return rec.run(ready)
    finally:
        os.close(lock)


# -- the commands ----------------------------------------------------------------


def start(spec: Spec, err: TextIO = sys.stderr) -> int:
    """Starts recording `spec.name`: its recorder process, then (detached)
    returns once it runs, or runs until it ends."""
    spec.dir = os.path.abspath(spec.dir)
    spec.check()
    sources = broker_stats(spec.server).sources     # it runs: its state may go beside it
    if spec.filter:
        CaptureFilter(spec.filter).check(sorted({s.linktype for s in sources}))
    sd = StateDir(spec.server, create=True)
    try:
        old = sd.read(spec.name)
        if old is not None:
            running = sd.running(spec.name)
            what = ("is running" if running else "exists (dead: its recorder is gone)"
                    if old["state"] in _LIVE else f"exists ({old['state']})")
            raise PktipcError(f"recording {spec.name!r} of broker {spec.server!r} {what}: "
                              f"pktipc record stop {spec.name} first")
        log = sd.log(spec.name)
    finally:
        sd.close()
    if not spec.detached:
        spec.starter = os.getpid()
    proc = subprocess.Popen([sys.executable, "-m", "pktipc._client.recording"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            start_new_session=spec.detached, close_fds=True)
    os.close(log)
    assert proc.stdin is not None and proc.stdout is not None
    words, told, interrupted = _Words(proc.stdout.fileno()), False, False
    deadline = 0.0              # for the recorder to end, then SIGKILL
    try:
        try:
            proc.stdin.write(json.dumps(asdict(spec)).encode())
            proc.stdin.close()
            words.wait(lines=1)
            if words.said(0).startswith("ok "):
                _started(spec, words.said(0), err)
                told = True
                if spec.detached:
                    return 0
            words.wait()                # until it ends, with this command
            deadline = time.monotonic() + STOP_TIMEOUT      # it closed its end: it exits
        except KeyboardInterrupt:
            # Interrupted (Ctrl-C), whenever: the recorder stops, closing its
            # file whole, and this command ends once it has.
            interrupted, deadline = True, time.monotonic() + STOP_TIMEOUT
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            words.wait(deadline=deadline)
        try:
            rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    finally:
        proc.stdout.close()
        with contextlib.suppress(OSError):
            proc.stdin.close()
    first, last = words.said(0), words.said(1)
    if interrupted and (spec.detached or not first.startswith("ok ")):
        raise KeyboardInterrupt
    if not first.startswith("ok "):
        raise PktipcError(first.removeprefix("error: ") or
                          f"the recorder exited ({rc}) without a word")
    if not told:
        _started(spec, first, err)
    if rc != 0:
        raise PktipcError(f"recording {spec.name!r} {last or 'failed'}")
    print(f"pktipc: recording {spec.name!r} {last or 'stopped'}", file=err)
    return 0


STOP_TIMEOUT = 30.0     # seconds a recorder has to end, told to or done, before SIGKILL


def _started(spec: Spec, first: str, err: TextIO) -> None:
    pid, fname = first.split(" ", 2)[1:]
    print(f"pktipc: recording {spec.name!r} of broker {spec.server!r}: {spec.bound()} in "
          f"{spec.dir} (pid {pid}, first file {fname})", file=err, flush=True)


class _Words:
    """The lines the recorder says on its stdout, read in short waits: a
    signal (Ctrl-C) is acted on within one of them whenever it came and
    whichever thread of the process took it. A read that blocks until the
    recorder speaks is interrupted only by a signal that comes while it
    blocks, and to this thread: one taken just before it, or by another
    thread, would leave this command waiting for ever on a recorder that
    waits for it to end."""

    WAIT = 0.25

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, b"", False

    def wait(self, lines: int | None = None, deadline: float | None = None) -> None:
        """Until it has said `lines` lines (None: until it closes its end),
        or until `deadline` (time.monotonic())."""
        while not self.eof and (lines is None or self.buf.count(b"\n") < lines):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if select.select([self.fd], [], [], self.WAIT if left is None
                             else min(self.WAIT, left))[0]:
                chunk = os.read(self.fd, 65536)
                self.buf += chunk
                self.eof = not chunk

    def said(self, n: int) -> str:
        """Its line `n` ("" if it did not say that many)."""
        lines = self.buf.decode(errors="replace").splitlines()
        return lines[n].strip() if n < len(lines) else ""


def stop(name: str, server: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Stops recording NAME if it runs and forgets it; its files stay.
    Returns its last state."""
    sd = _find(name, server)
    try:
        pid = sd.running(name)
        if pid is not None and pid > 0:
            _end_process(pid, timeout, lambda: sd.running(name) is not None)
        state = sd.read(name) or {}
        sd.remove(name)
        return state
    finally:
        sd.close()


def _end_process(pid: int, timeout: float, still: Any) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not still():             # its pid may have gone to another process since
            return
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], timeout)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 5)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def recordings(server: str | None = None) -> list[dict[str, Any]]:
    """Every recording's state, with "state" "dead" for one whose recorder
    vanished without a word."""
    out = []
    for sd in StateDir.every(server):
        try:
            for name in sd.names():
                st = sd.read(name)
                if st is None:
                    continue
                if st["state"] in _LIVE and not sd.running(name):
                    st["state"], st["why"] = "dead", "its recorder is gone (killed?)"
                out.append(st)
        finally:
            sd.close()
    return out


def list_text(recs: list[dict[str, Any]]) -> str:
    if not recs:
        return "no recording"
    rows = [("NAME", "BROKER", "STATE", "PACKETS", "BYTES", "DROPS", "FILES", "OLDEST (UTC)",
             "NEWEST (UTC)")]
    notes = []
    for r in recs:
        files = r.get("files", [])
        firsts = [f["first_ns"] for f in files if f["first_ns"] is not None]
        lasts = [f["last_ns"] for f in files if f["last_ns"] is not None]
        drops = r.get("drops", {})
        rows.append((r["name"], r["server"], r["state"], str(r.get("packets", 0)),
                     str(r.get("bytes", 0)), str(sum(drops.values())), str(len(files)),
                     _ns_text(min(firsts, default=None)), _ns_text(max(lasts, default=None))))
        if r.get("why") and r["state"] != "running":
            notes.append(f"{r['name']}: {r['state']}: {r['why']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines + notes)


def attach(name: str, out: BinaryIO, *, server: str | None = None, follow: bool = True,
           poll: float = 0.02) -> int:
    """Writes what recording NAME holds, from its oldest packet still kept,
    as one pcapng stream; with `follow`, then the packets it records until
    interrupted (KeyboardInterrupt) or it ends. Returns the packets written.

    Every file is opened as soon as the state lists it, so that the
    recording may remove it meanwhile; one removed before it was even seen
    (the recording went round its files faster than this reads) is a hole,
    and an error."""
    sd = _find(name, server)
    merger = pcapng.Merger()
    fds: dict[int, int] = {}            # file number -> its fd, opened once listed
    last = 0                            # the last file read through

    def state() -> dict[str, Any]:
        st = sd.read(name)
        if st is None:
            return {"state": "stopped", "files": []}
        if st["state"] in _LIVE and not sd.running(name):
            st["state"] = "dead"
        for f in st["files"]:
            if f["number"] > last and f["number"] not in fds:
                try:
                    fds[f["number"]] = os.open(Path(st["dir"]) / f["name"],
                                               os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    pass                # removed since the state was written
        return st

    try:
        st = state()
        pcapng.write_all(out, pcapng.section_header(
            f"pktipc recording {name!r} of broker {st.get('server')!r}"))
        while True:
            n = min((k for k in fds if k > last), default=None)
            if n is None:
                if not follow or st["state"] not in _LIVE:
                    break
                time.sleep(poll)
                st = state()
                continue
            if last and n != last + 1:
                raise PktipcError(f"files {last + 1} to {n - 1} of recording {name!r} were "
                                  "removed before they could be read: it went round its "
                                  "files faster than this reader")
            fd, reader = fds.pop(n), merger.file()
            try:
                while True:
                    # Decided before reading: a later file listed, or the
                    # recording over, means this one was complete by then.
                    done = (any(k > n for k in fds) or st["state"] not in _LIVE
                            or any(f["number"] > n for f in st["files"]))
                    pcapng.write_all(out, reader.read(fd))
                    if done or not follow:
                        break
                    time.sleep(poll)
                    st = state()
            finally:
                os.close(fd)
            last = n
    except KeyboardInterrupt:
        pass
    finally:
        for fd in fds.values():
            os.close(fd)
        sd.close()
    return merger.packets


if __name__ == "__main__":
    sys.exit(recorder_main())
