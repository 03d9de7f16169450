/*
 * The XDP program of `pktipc serve --xdp`: every frame of a receive queue
 * that has an AF_XDP socket goes to it, after a prefix that says when it met
 * XDP (struct pkb_xdp_prefix). Frames of queues without a socket go on to the
 * kernel's stack, untouched. Built by clang (-target bpf) when pktipc is
 * built, and embedded in the extension (xdp.c loads it with libbpf).
 *
 * The time goes before the frame, not into XDP metadata: some kernels refuse
 * bpf_xdp_adjust_meta to XDP programs, every kernel with XDP allows
 * bpf_xdp_adjust_head, and drivers keep XDP_PACKET_HEADROOM free for it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "xdp_meta.h"

/* One entry per receive queue; its size is set when loaded. */
struct {
    __uint(type, BPF_MAP_TYPE_XSKMAP);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} pktipc_xsks SEC(".maps");

SEC("xdp")
int pktipc_xdp(struct xdp_md *ctx)
{
    __u32 queue = ctx->rx_queue_index;
    if (!bpf_map_lookup_elem(&pktipc_xsks, &queue))
        return XDP_PASS;
    if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct pkb_xdp_prefix)))
        return XDP_PASS;        /* no headroom: never, with XDP_PACKET_HEADROOM */
    struct pkb_xdp_prefix *p = (void *)(long)ctx->data;
    if ((void *)(p + 1) > (void *)(long)ctx->data_end)
        return XDP_ABORTED;
    p->tai_ns = bpf_ktime_get_tai_ns();
    /* Prefixed, the frame is for the socket alone (it left a moment ago if
     * the redirect fails: the broker is closing). */
    return bpf_redirect_map(&pktipc_xsks, queue, XDP_DROP);
}

char _license[] SEC("license") = "Dual BSD/GPL";
