/*
 * Broker-side live capture: one AF_PACKET TPACKET_V3 receive ring per
 * interface. Declarations only (cffi's cdef() reads this file as it is).
 * Fills the same struct pkb_fill as the file ingest (ingest.h).
 */

/* pkb_ring_opts.fanout_id */
#define PKB_FANOUT_NONE  -1
#define PKB_FANOUT_AUTO  -2  /* a group id no other socket uses, chosen by the kernel */

/* pkb_ring_open() failures, with the reason in errbuf */
#define PKB_RING_ESYS        1   /* a system call failed */
#define PKB_RING_ENODEV      2   /* no such interface */
#define PKB_RING_EDOWN       3   /* the interface is down */
#define PKB_RING_EPERM       4   /* not permitted: CAP_NET_RAW is missing */
#define PKB_RING_EFILTER     5   /* the filter does not compile: libpcap's message */
#define PKB_RING_EUNSUPP     6   /* link type or option the interface does not support */

struct pkb_ring_opts {
    const char *ifname;
    const char *filter;         /* tcpdump syntax; "" captures everything */
    uint32_t snaplen;
    uint32_t block_size;        /* bytes, a power of two multiple of the page size */
    uint32_t block_count;
    uint32_t block_timeout_ms;  /* a block is handed over at the latest this long after its first packet */
    int32_t fanout_id;          /* 0..65535, or PKB_FANOUT_NONE / PKB_FANOUT_AUTO */
    uint32_t fanout_mode;       /* PACKET_FANOUT_* (hash: with the defragmentation flag) */
    uint8_t promisc;
    uint8_t hw_timestamps;
    uint8_t vlan_reinsert;      /* put a tag the kernel stripped back into the bytes */
    uint8_t reserved;
};

typedef struct pkb_ring pkb_ring;

/* Opens, filters, maps and binds a ring: NULL with *err (PKB_RING_E*)
 * and a one-line reason in errbuf (PKB_ERRBUF_SIZE bytes) on failure. */
pkb_ring *pkb_ring_open(const struct pkb_ring_opts *o, int *err, char *errbuf);
int pkb_ring_fd(const pkb_ring *r);
uint32_t pkb_ring_ifindex(const pkb_ring *r);
uint32_t pkb_ring_linktype(const pkb_ring *r);
/* The fanout group joined (PKB_FANOUT_NONE when none). */
int32_t pkb_ring_fanout_id(const pkb_ring *r);

/* Copies packets of retired blocks into f's slab, handing each block back to
 * the kernel once all of it is copied, until PKB_FILL_FULL (the slab is
 * full, or max_pkts are in it: the rest waits in the ring), PKB_FILL_EMPTY
 * or PKB_FILL_TOOBIG (a frame larger than an empty slab). */
int pkb_ring_fill(pkb_ring *r, struct pkb_fill *f, uint32_t max_pkts);

/* Adds the kernel's counters since the previous call (the kernel resets
 * them when read) into the interface's monotonic counters; -1 on error. */
int pkb_ring_stats(pkb_ring *r, struct pktipc_iface *e);

/* The socket's pending error (after POLLERR), as errno; 0 if none. */
int pkb_ring_sock_error(pkb_ring *r);

/* Leaves a keeper process that puts back the timestamping configuration of
 * the rings' interfaces (those opened with hw_timestamps) once this process
 * is gone, however it ends: 0, or -1 with the reason in errbuf. */
int pkb_ring_keep_timestamping(pkb_ring *const *rings, uint32_t n, char *errbuf);

/* Closes the ring, putting back the interface's timestamping configuration. */
void pkb_ring_close(pkb_ring *r);
