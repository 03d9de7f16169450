"""Builds pktipc._shm, the cffi extension, in out-of-line API mode.

The declarations come as they are from shm/ (the layout header, the single
source of truth for the shared-memory layout, and the real symbols of
pktipc_shm.h's inline helpers) and from the broker's engines in
pktipc/_broker/engine/ (the flow hash, file ingest, live capture). Nothing
about the layout is written again here.
"""

from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
SHM = "shm"                           # what every reader of the segment needs
ENGINE = "pktipc/_broker/engine"      # the broker's capture engines
CLIENT = "pktipc/_client/engine"      # the client's capture-file writer

HEADERS = [f"{SHM}/pktipc_layout.h", f"{SHM}/pktipc_shm_ffi.h", f"{ENGINE}/flowhash.h",
           f"{ENGINE}/ingest.h", f"{ENGINE}/afpacket.h", f"{ENGINE}/remote.h",
           f"{CLIENT}/capwrite.h"]

ffibuilder = cffi.FFI()
ffibuilder.cdef("".join((ROOT / h).read_text() for h in HEADERS))
ffibuilder.set_source(
    "pktipc._shm",
    "#include <stdint.h>\n" + "".join(f'#include "{Path(h).name}"\n' for h in HEADERS),
    # setuptools wants paths relative to setup.py
    sources=[f"{ENGINE}/ingest.c", f"{ENGINE}/afpacket.c", f"{ENGINE}/flowhash.c",
             f"{ENGINE}/remote.c",
             f"{SHM}/pktipc_shm.c", f"{CLIENT}/capwrite.c"],
    include_dirs=[SHM, ENGINE, CLIENT],
    libraries=["pcap"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
