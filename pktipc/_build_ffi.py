"""Builds pktipc._shm, the cffi extension, in out-of-line API mode.

The declarations come from shm/ as they are: the layout header (the single
source of truth for the shared-memory layout) and the broker's ingest
helpers. Nothing about the layout is written again here.
"""

from pathlib import Path

import cffi

SHM = Path(__file__).resolve().parent.parent / "shm"

ffibuilder = cffi.FFI()
ffibuilder.cdef("".join((SHM / h).read_text()
                         for h in ("pktipc_layout.h", "ingest.h", "afpacket.h")))
ffibuilder.set_source(
    "pktipc._shm",
    '#include "pktipc_shm.h"\n#include "ingest.h"\n#include "afpacket.h"\n',
    sources=["shm/ingest.c", "shm/afpacket.c"],  # setuptools wants paths relative to setup.py
    include_dirs=["shm"],
    libraries=["pcap"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
