"""The broker's footing in the operating system: its runtime directory and
lock, the segments a dead broker left, its own segment, its file limit.

Set up once before the loop, undone at exit. Nothing found on disk is
trusted: a directory, lock file or segment that another user could have
made or replaced is refused (with one line saying what is wrong and how to
fix it) or skipped (and said so), never followed, truncated or blocked on.
"""

from __future__ import annotations

import fcntl
import grp
import mmap
import os
import pwd
import re
import resource
import stat
from pathlib import Path
from typing import TextIO

import posix_ipc

from .._errors import PktipcError
from .._paths import segment_prefix
from .._shm import ffi

SHM_DIR = Path("/dev/shm")
NR_OPEN = Path("/proc/sys/fs/nr_open")


def _who(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def _us() -> str:
    me = os.geteuid()
    return "root" if me == 0 else f"{_who(me)} or root"


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"--allow-group {group}: no such group") from None


def _check_ancestors(path: Path) -> None:
    """Every directory above `path` must be out of other users' reach: owned
    by root or us, and writable by nobody else unless sticky (as /tmp is,
    where others cannot rename what is ours). A symbolic link on the way
    must be root's or ours."""
    me = os.geteuid()
    for parent in reversed(path.parents):
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            return                      # created below, by us
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, me):
                raise PktipcError(f"{parent}, above the runtime directory, is a symbolic link "
                                  f"of {_who(st.st_uid)}: use a runtime directory whose path "
                                  "only root or you can change (PKTIPC_RUNTIME_DIR)")
            st = os.stat(parent)
        writable = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, me) or writable:
            raise PktipcError(f"{parent}, above the runtime directory, can be changed by "
                              f"{_who(st.st_uid) if st.st_uid not in (0, me) else 'other users'}"
                              ": use a runtime directory whose path only root or you can "
                              "change (PKTIPC_RUNTIME_DIR)")


def make_runtime_dir(path: Path, owner: pwd.struct_passwd | None = None) -> None:
    """Creates the runtime directory and its missing parents (0755, the
    directory itself 0750), for `owner` if given (as root, for --user)."""
    _check_ancestors(path)
    for d in (*reversed(path.parents), path):
        try:
            os.mkdir(d, 0o750 if d == path else 0o755)
        except FileExistsError:
            continue
        if owner is not None and d == path:
            os.chown(d, owner.pw_uid, owner.pw_gid, follow_symlinks=False)


def open_runtime_dir(path: Path, gid: int | None) -> int:
    """The runtime directory, opened (made first if missing) and checked: a
    directory, not a link, ours (or root's), and writable by nobody else.
    With `gid` (--allow-group) it is made that group's, setgid, so that the
    socket bound in it is the group's from its first instant. Returns the
    directory's fd, which the lock and the socket are made relative to."""
    make_runtime_dir(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        what = "a symbolic link" if os.path.islink(path) else e.strerror
        raise PktipcError(f"runtime directory {path}: {what}; remove it, or set "
                          "PKTIPC_RUNTIME_DIR to a directory of your own") from None
    try:
        st = os.fstat(fd)
        me = os.geteuid()
        if st.st_uid not in (me, 0):
            raise PktipcError(f"runtime directory {path} belongs to {_who(st.st_uid)}, not to "
                              f"{_us()}: remove it, or set PKTIPC_RUNTIME_DIR to a directory "
                              "of your own")
        if st.st_mode & 0o022:
            raise PktipcError(f"runtime directory {path} can be written by other users "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w it, or set "
                              "PKTIPC_RUNTIME_DIR to a directory of your own")
        if gid is not None and st.st_uid == me:
            os.fchown(fd, -1, gid)
            os.fchmod(fd, 0o2750)
        return fd
    except BaseException:
        os.close(fd)
        raise


class Lock:
    """One broker per name and runtime directory: an flock on NAME.lock,
    which holds the pid. Opened without following a link, and refused
    unless it is a plain file of ours with no other name."""

    def __init__(self, dirfd: int, name: str) -> None:
        self.dirfd = dirfd
        self.file = f"{name}.lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        while True:
            try:
                fd = os.open(self.file, flags, 0o600, dir_fd=dirfd)
            except OSError as e:
                raise PktipcError(f"lock file {self.file}: {e.strerror} (a symbolic link or "
                                  "another kind of file there is refused: remove it)") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                os.close(fd)
                raise PktipcError(f"lock file {self.file} is not a plain file of "
                                  f"{_who(os.geteuid())}: remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise PktipcError(f"a broker named {name!r} is already running"
                                  + (f" (pid {other})" if other else "")) from None
            # The previous holder unlinks the file as it exits: a lock taken on
            # the unlinked file guards nothing, so take it again on the new one.
            if self._same(st):
                break
            os.close(fd)
        self.fd = fd
        self.ino = st.st_ino
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _same(self, st: os.stat_result) -> bool:
        try:
            now = os.stat(self.file, dir_fd=self.dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def release(self) -> None:
        st = os.fstat(self.fd)
        if self._same(st):
            os.unlink(self.file, dir_fd=self.dirfd)
        os.close(self.fd)


def _segment_pid(fd: int) -> int:
    """The broker pid recorded in a segment's header, 0 if none."""
    off = ffi.offsetof("struct pktipc_header", "broker_pid")
    head = os.pread(fd, 4, off)
    return int.from_bytes(head, "little") if len(head) == 4 else 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_segments(name: str, log: TextIO) -> list[str]:
    """Removes the segments of broker `name` whose broker is dead (killed,
    or aborted, before it could remove its own), saying so; returns their
    names. Only plain files of ours are opened, without following links or
    blocking, and checked before they are read; anything else is skipped
    and reported. (The pid is checked, not only our lock: a live broker of
    the same name under another runtime directory is spared.)"""
    pattern = re.compile(re.escape(segment_prefix(name)) + "[0-9a-f]{16}")
    removed = []
    for entry in sorted(SHM_DIR.iterdir()):
        if not pattern.fullmatch(entry.name):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            print(f"pktipc: skipped {entry}: {e.strerror}", file=log, flush=True)
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                print(f"pktipc: skipped {entry}: not a segment of {_who(os.geteuid())} "
                      f"(it belongs to {_who(st.st_uid)}); remove it by hand if it is stale",
                      file=log, flush=True)
                continue
            pid = _segment_pid(fd)
            if _alive(pid):
                continue
            now = os.stat(entry, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                entry.unlink()
                removed.append(entry.name)
                print(f"pktipc: removed {entry}, left by a broker that is gone (pid {pid})",
                      file=log, flush=True)
        except OSError as e:
            print(f"pktipc: skipped {entry}: {e.strerror}", file=log, flush=True)
        finally:
            os.close(fd)
    return removed


def create_segment(shm_name: str, size: int, gid: int | None) -> mmap.mmap:
    """A new segment (never an existing one) of `size` bytes, reserved in
    full, mode 0600 (0640 with the group of --allow-group), mapped."""
    shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        # Reserve the memory now: a sparse segment that cannot be backed
        # later would kill the broker with SIGBUS mid-run.
        os.posix_fallocate(shm.fd, 0, size)
        if gid is not None:
            os.fchown(shm.fd, -1, gid)
            os.fchmod(shm.fd, 0o640)     # the group maps it read-only, as anyone
        return mmap.mmap(shm.fd, size)
    except OSError as e:
        shm.unlink()
        raise PktipcError(f"cannot allocate {size >> 20} MiB of shared memory in /dev/shm "
                          f"({e.strerror}); lower --slabs or --slab-size") from None
    finally:
        shm.close_fd()


def raise_fd_limit() -> int:
    """Raises the soft limit on open files to the hard one (root also raises
    the hard one, to the kernel's nr_open); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0:
        try:
            hard = max(hard, min(int(NR_OPEN.read_text()), 1 << 20))
        except (OSError, ValueError):
            pass
    for want in (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            continue
    return soft
