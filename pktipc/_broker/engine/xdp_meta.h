/*
 * What the XDP program (xdp.bpf.c) puts before each frame it hands to a
 * socket, for the broker (xdp.c). Included by both; not read by cffi.
 */
#ifndef PKB_XDP_META_H
#define PKB_XDP_META_H

/* Every frame in an RX ring starts with this; the frame follows it. */
struct pkb_xdp_prefix {
    __u64 tai_ns;       /* CLOCK_TAI when the frame met XDP */
};

#endif /* PKB_XDP_META_H */
