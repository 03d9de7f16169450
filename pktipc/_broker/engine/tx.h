/*
 * Broker-side sending: one AF_PACKET TPACKET_V2 TX ring per interface the
 * broker sends on, filled from the clients' TX areas (the layout's struct
 * pktipc_tx_*), one call per batch. Declarations only (cffi's cdef() reads
 * this file as it is).
 */

/* pkb_tx_copy() results */
#define PKB_TX_DONE      0   /* every frame of the batch is copied or refused */
#define PKB_TX_FULL      1   /* a ring has no room for the next frame: the rest waits */
#define PKB_TX_FAULT     2   /* the area shrank under the copy (SIGBUS): it is unusable */

/* Why a frame is refused: its index in pkb_tx_result.refused */
#define PKB_TX_EMPTY     0   /* no byte at all */
#define PKB_TX_SHORT     1   /* shorter than the interface's link-layer header */
#define PKB_TX_LONG      2   /* longer than the interface sends, or than a slot of the area */
#define PKB_TX_NOIFACE   3   /* the broker has no such interface */
#define PKB_TX_NOTX      4   /* the broker does not send on that interface */
#define PKB_TX_REASONS   5

struct pkb_txring_opts {
    const char *ifname;
    uint32_t frame_count;       /* frames in the ring */
    uint8_t qdisc_bypass;       /* PACKET_QDISC_BYPASS: straight to the driver */
    uint8_t reserved[3];
};

/* What one call did to one ring. */
struct pkb_tx_io {
    uint32_t placed;            /* frames copied into the ring */
    uint32_t taken;             /* frames the kernel took from the ring */
    int32_t error;              /* errno of the kernel's refusal to take more, 0 if none */
    uint32_t reserved;
};

struct pkb_tx_result {
    uint32_t done;              /* frames of the batch handled: copied or refused */
    uint32_t copied;
    uint32_t refused[5];        /* by reason, PKB_TX_* */
    uint32_t first_refused;     /* the first refused frame's index in the batch ... */
    uint32_t first_reason;      /* ... why ... */
    uint32_t first_len;         /* ... its length ... */
    uint32_t first_iface;       /* ... its interface */
    uint32_t full_iface;        /* PKB_TX_FULL: whose ring is full */
};

typedef struct pkb_txring pkb_txring;
typedef struct pkb_txarea pkb_txarea;

/* Opens, binds and maps a TX ring on an interface; NULL with *err (the
 * PKB_RING_E* of afpacket.h) and a one-line reason in errbuf on failure. */
pkb_txring *pkb_txring_open(const struct pkb_txring_opts *o, int *err, char *errbuf);
int pkb_txring_fd(const pkb_txring *r);
/* The longest frame the ring sends: the interface's link-layer header and
 * MTU (as last read, by pkb_txring_open or pkb_txring_refresh), and on
 * Ethernet 4 bytes more for an 802.1Q tag (a frame that is not tagged so is
 * 4 bytes shorter at most); at most a ring frame. */
uint32_t pkb_txring_max_len(const pkb_txring *r);
/* Reads the interface's MTU again: 0, or -1 (errno). */
int pkb_txring_refresh(pkb_txring *r);
/* Frames copied into the ring that the kernel has not taken yet. */
uint32_t pkb_txring_pending(const pkb_txring *r);
/* Asks the kernel to take the frames copied into the ring (send(), never
 * waiting); adds to io->taken what it took since the last call, and sets
 * io->error to send()'s errno if it refused (they stay, for the next call). */
void pkb_txring_flush(pkb_txring *r, struct pkb_tx_io *io);
void pkb_txring_close(pkb_txring *r);

/* Maps the TX area of `fd` read-only (`size` bytes, its size when it was
 * checked) and checks its header (pktipc_tx_attach): NULL with the reason
 * in errbuf (PKB_ERRBUF_SIZE bytes) on failure. */
pkb_txarea *pkb_txarea_open(int fd, uint64_t size, char *errbuf);
uint32_t pkb_txarea_frame_count(const pkb_txarea *a);
uint32_t pkb_txarea_frame_size(const pkb_txarea *a);
void pkb_txarea_close(pkb_txarea *a);

/* Copies the frames of slots first .. first + n - 1 (mod the area's slots)
 * of area `a` into the rings of their interfaces, rings[iface] (NULL where
 * the broker does not send; nrings of them), in order; a frame a ring
 * would not send is refused, and counted. Stops at the first frame whose
 * ring is full (PKB_TX_FULL) or at a SIGBUS (PKB_TX_FAULT: the area's file
 * shrank). Then flushes every ring it copied into (pkb_txring_flush):
 * io[i] (nrings of them, zeroed by the caller) says what happened to ring i.
 * Reads each descriptor once, and checks that copy. */
int pkb_tx_copy(pkb_txarea *a, uint64_t first, uint32_t n, pkb_txring **rings, uint32_t nrings,
                struct pkb_tx_io *io, struct pkb_tx_result *res);

/* For pktipc replay, a client's side: the `count` frames of a slab filled
 * by pkb_src_fill into slots first.. of the TX area at `base` (header `h`,
 * as written), for interface `iface`, each with its descriptor; a frame
 * longer than a slot is skipped (counted in *skipped). The frames placed;
 * their bytes are added to *bytes. */
uint32_t pkb_tx_put(const uint8_t *slab, uint32_t count, uint8_t *base,
                    const struct pktipc_tx_header *h, uint64_t first, uint16_t iface,
                    uint32_t *skipped, uint64_t *bytes);
