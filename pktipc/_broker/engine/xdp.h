/*
 * Broker-side AF_XDP capture: one socket per receive queue of an
 * interface, their UMEM the segment's frame area, so that the kernel (or
 * the NIC) writes each frame where clients read it and the broker writes
 * its descriptor alone. Declarations only (cffi's cdef() reads this file as
 * it is). Fills the same struct pkb_fill as the other engines (ingest.h).
 */

/* pkb_xdp_open() and pkb_xdp_bind() failures, with the reason in errbuf */
#define PKB_XDP_EFAIL    1   /* refused: the interface, the kernel or the options */
#define PKB_XDP_EPERM    2   /* not permitted: a capability is missing */

/* pkb_xdp_opts.mode */
#define PKB_XDP_NATIVE   0   /* in the driver */
#define PKB_XDP_SKB      1   /* generic XDP, after the kernel made an skb */

struct pkb_xdp_opts {
    const char *ifname;
    const char *filter;         /* tcpdump syntax, run by the broker; "" takes everything */
    const uint32_t *queues;     /* receive queues to capture, or NULL: every one */
    uint32_t queue_count;
    uint32_t snaplen;
    uint32_t frame_size;        /* 2048 or 4096; 0: the smallest the MTU fits */
    uint32_t frame_count;       /* frames in the UMEM */
    uint32_t ring_size;         /* entries of each fill and RX ring, a power of two */
    uint8_t mode;               /* PKB_XDP_NATIVE or PKB_XDP_SKB */
    uint8_t zero_copy;          /* refuse unless the driver does zero-copy */
    uint8_t promisc;            /* the interface in promiscuous mode while open */
    uint8_t reserved;
};

/* What the sockets' XDP_STATISTICS say, summed, and the frames read. */
struct pkb_xdp_counts {
    uint64_t received;          /* frames read from the RX rings */
    uint64_t filtered;          /* ... of those, refused by the filter */
    uint64_t rx_dropped;        /* the kernel's: no frame free, or too large */
    uint64_t rx_ring_full;      /* the kernel's: the RX ring was full */
    uint64_t rx_fill_ring_empty_descs;
    uint64_t free_frames;       /* the broker's, neither in the kernel's rings nor in slabs */
    uint64_t held_frames;       /* described by slabs not yet free */
};

typedef struct pkb_xdp pkb_xdp;

/* Checks the interface and the options, compiles the filter, loads the XDP
 * program and attaches it (a BPF link: gone with the process): NULL with
 * *err (PKB_XDP_E*) and a one-line reason in errbuf (PKB_ERRBUF_SIZE
 * bytes) on failure. No socket yet: see pkb_xdp_bind. */
pkb_xdp *pkb_xdp_open(const struct pkb_xdp_opts *o, int *err, char *errbuf);
uint32_t pkb_xdp_ifindex(const pkb_xdp *x);
uint32_t pkb_xdp_frame_size(const pkb_xdp *x);
uint32_t pkb_xdp_queue_count(const pkb_xdp *x);    /* sockets: queues captured */
uint32_t pkb_xdp_queue(const pkb_xdp *x, uint32_t i);

/* Registers `frames` (frame_count frames of frame_size bytes, page-aligned)
 * as the UMEM and opens a socket per queue, every frame given to the
 * kernel. `slabs` is the first of the segment's slab_count slabs of
 * slab_size bytes, which pkb_xdp_fill fills and pkb_xdp_recycle reads.
 * 0, or -1 with *err and errbuf. */
int pkb_xdp_bind(pkb_xdp *x, uint8_t *frames, uint8_t *slabs, uint32_t slab_size,
                 uint32_t slab_count, int *err, char *errbuf);
int pkb_xdp_fd(const pkb_xdp *x, uint32_t i);     /* socket i: readable when frames wait */
uint8_t pkb_xdp_zero_copy(const pkb_xdp *x);      /* the sockets are in zero-copy mode */

/* Writes a descriptor into f's slab for each frame the kernel placed, until
 * PKB_FILL_FULL (the slab has no room for another descriptor, or holds
 * max_pkts) or PKB_FILL_EMPTY (the RX rings are empty). Frames the filter
 * refuses go back to the kernel at once. */
int pkb_xdp_fill(pkb_xdp *x, struct pkb_fill *f, uint32_t max_pkts);

/* Slab `slab` is free again: the frames its descriptors name go back to
 * the kernel's fill rings. Idempotent. */
void pkb_xdp_recycle(pkb_xdp *x, uint32_t slab);

/* 1 when the kernel is short of frames: none is free, and the fill rings
 * hold less than half of what they should; the broker then takes back slabs
 * owed only to drop clients (pkb_xdp_recycle gives their frames back). */
int pkb_xdp_short(pkb_xdp *x);

/* Adds to e what the kernel counted since the previous call: drops (no free
 * frame, too large, RX ring full), times no frame was free, and the frames
 * read past the filter; -1 on error. */
int pkb_xdp_stats(pkb_xdp *x, struct pktipc_iface *e);
void pkb_xdp_counts(pkb_xdp *x, struct pkb_xdp_counts *c);

/* Detaches the program, closes the sockets, releases the UMEM. */
void pkb_xdp_close(pkb_xdp *x);
