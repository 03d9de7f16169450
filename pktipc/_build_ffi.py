"""Builds pktipc._shm, the cffi extension, in out-of-line API mode.

The declarations come as they are from shm/ (the layout header, the single
source of truth for the shared-memory layout, and the real symbols of
pktipc_shm.h's inline helpers, the clients' filter) and from the broker's
engines in pktipc/_broker/engine/ (the flow hash, file ingest, live
capture, AF_XDP capture, sending). Nothing about the layout is written again
here. The XDP program is compiled by clang (-target bpf) and carried in the
extension.
"""

import subprocess
import sysconfig
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
SHM = "shm"                           # what every reader of the segment needs
ENGINE = "pktipc/_broker/engine"      # the broker's capture engines
GENERATED = "build/engine"            # the XDP program, built here as a C array
CLIENT = "pktipc/_client/engine"      # the client's capture-file writer

HEADERS = [f"{SHM}/pktipc_layout.h", f"{SHM}/pktipc_shm_ffi.h", f"{SHM}/pktipc_filter.h",
           f"{ENGINE}/flowhash.h", f"{ENGINE}/ingest.h", f"{ENGINE}/afpacket.h",
           f"{ENGINE}/xdp.h", f"{ENGINE}/tx.h", f"{ENGINE}/remote.h", f"{ENGINE}/acceptguard.h",
           f"{CLIENT}/capwrite.h"]

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


def build_xdp_program() -> None:
    """Compiles the XDP program (xdp.bpf.c) with clang, and writes it as the
    C array pkb_xdp_prog[] that xdp.c loads: the extension carries it."""
    out = ROOT / GENERATED
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "xdp.bpf.o"
    arch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}",
                    f"-I{ROOT / ENGINE}", "-c", str(ROOT / ENGINE / "xdp.bpf.c"), "-o", str(obj)],
                   check=True)
    data = obj.read_bytes()
    rows = (", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16))
    (out / "xdp_prog.h").write_text(
        "/* Generated from xdp.bpf.c by pktipc/_build_ffi.py: do not edit. */\n"
        "static const unsigned char pkb_xdp_prog[] = {\n    " + ",\n    ".join(rows) + "\n};\n")


build_xdp_program()
ffibuilder = cffi.FFI()
ffibuilder.cdef("".join((ROOT / h).read_text() for h in HEADERS) + TIMERFD)
ffibuilder.set_source(
    "pktipc._shm",
    "#include <stdint.h>\n#include <time.h>\n#include <sys/timerfd.h>\n"
    + "".join(f'#include "{Path(h).name}"\n' for h in HEADERS),
    # setuptools wants paths relative to setup.py
    sources=[f"{ENGINE}/ingest.c", f"{ENGINE}/afpacket.c", f"{ENGINE}/xdp.c",
             f"{ENGINE}/cbpf.c", f"{ENGINE}/tx.c", f"{ENGINE}/sigbus.c",
             f"{ENGINE}/flowhash.c", f"{ENGINE}/remote.c", f"{ENGINE}/acceptguard.c",
             f"{SHM}/pktipc_shm.c",
             f"{SHM}/pktipc_filter.c", f"{CLIENT}/capwrite.c"],
    include_dirs=[SHM, ENGINE, CLIENT, str(ROOT / GENERATED)],
    libraries=["pcap", "xdp", "bpf"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
