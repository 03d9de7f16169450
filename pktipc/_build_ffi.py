"""Builds pktipc._shm, the cffi extension, in out-of-line API mode.

The declarations come as they are from shm/ (the layout header, the single
source of truth for the shared-memory layout, and the real symbols of
pktipc_shm.h's inline helpers, the clients' filter) and from the broker's
engines in pktipc/_broker/engine/ (the flow hash, file ingest, live
capture, sending). Nothing about the layout is written again here.
"""

from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
SHM = "shm"                           # what every reader of the segment needs
ENGINE = "pktipc/_broker/engine"      # the broker's capture engines
CLIENT = "pktipc/_client/engine"      # the client's capture-file writer

HEADERS = [f"{SHM}/pktipc_layout.h", f"{SHM}/pktipc_shm_ffi.h", f"{SHM}/pktipc_filter.h",
           f"{ENGINE}/flowhash.h", f"{ENGINE}/ingest.h", f"{ENGINE}/afpacket.h",
           f"{ENGINE}/tx.h", f"{ENGINE}/remote.h", f"{CLIENT}/capwrite.h"]

# The Python client's pollable descriptor holds a timer: timerfd, which
# Python's os module offers only from 3.13.
TIMERFD = """
#define CLOCK_MONOTONIC ...
#define TFD_NONBLOCK ...
#define TFD_CLOEXEC ...
#define TFD_TIMER_ABSTIME ...
struct timespec { long tv_sec; long tv_nsec; ...; };
struct itimerspec { struct timespec it_interval; struct timespec it_value; };
int timerfd_create(int clockid, int flags);
int timerfd_settime(int fd, int flags, const struct itimerspec *new_value,
                    struct itimerspec *old_value);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef("".join((ROOT / h).read_text() for h in HEADERS) + TIMERFD)
ffibuilder.set_source(
    "pktipc._shm",
    "#include <stdint.h>\n#include <time.h>\n#include <sys/timerfd.h>\n"
    + "".join(f'#include "{Path(h).name}"\n' for h in HEADERS),
    # setuptools wants paths relative to setup.py
    sources=[f"{ENGINE}/ingest.c", f"{ENGINE}/afpacket.c", f"{ENGINE}/tx.c",
             f"{ENGINE}/sigbus.c", f"{ENGINE}/flowhash.c", f"{ENGINE}/remote.c",
             f"{SHM}/pktipc_shm.c", f"{SHM}/pktipc_filter.c", f"{CLIENT}/capwrite.c"],
    include_dirs=[SHM, ENGINE, CLIENT],
    libraries=["pcap"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
