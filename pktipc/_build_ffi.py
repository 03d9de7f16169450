"""Builds pktipc._shm, the cffi extension, in out-of-line API mode.

The declarations come from shm/ as they are: the layout header (the single
source of truth for the shared-memory layout), the real symbols of
pktipc_shm.h's inline helpers, the flow hash and the broker's ingest helpers.
Nothing about the layout is written again here.
"""

from pathlib import Path

import cffi

SHM = Path(__file__).resolve().parent.parent / "shm"

HEADERS = ["pktipc_layout.h", "pktipc_shm_ffi.h", "flowhash.h", "ingest.h", "afpacket.h"]

ffibuilder = cffi.FFI()
ffibuilder.cdef("".join((SHM / h).read_text() for h in HEADERS))
ffibuilder.set_source(
    "pktipc._shm",
    "#include <stdint.h>\n" + "".join(f'#include "{h}"\n' for h in HEADERS),
    # setuptools wants paths relative to setup.py
    sources=["shm/ingest.c", "shm/afpacket.c", "shm/flowhash.c", "shm/pktipc_shm.c"],
    include_dirs=["shm"],
    libraries=["pcap"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
