/*
 * Broker-side helpers compiled into the pktipc extension: declarations only
 * (cffi's cdef() reads this file as it is). Consumers never need these.
 */

/* pkb_src_fill() results */
#define PKB_FILL_FULL    1   /* the slab cannot take the next packet; it stays pending */
#define PKB_FILL_EOF     2   /* the source has no more packets */
#define PKB_FILL_LIMIT   3   /* the next packet is later than ts_limit; it stays pending */
#define PKB_FILL_ERROR   4   /* the source failed: pkb_src_error() says why */
#define PKB_FILL_TOOBIG  5   /* the next packet does not fit even an empty slab */
#define PKB_FILL_EMPTY   6   /* live: nothing waits in the kernel's rings: poll their fds */

#define PKB_ERRBUF_SIZE  512

/* Broker-private cursor over the slab being filled. Descriptors grow up from
 * the slab's start, frames grow down from its end, until they would meet
 * (frames placed by the kernel in the frame area take a descriptor only). */
struct pkb_fill {
    uint8_t *slab;
    uint32_t slab_size;
    uint32_t count;        /* descriptors written */
    uint32_t data_low;     /* lowest byte of frame data; slab_size when empty */
    uint32_t iface;        /* written into every descriptor */
    uint64_t bytes;        /* captured bytes written */
    int64_t first_ts_ns;
    int64_t last_ts_ns;
    uint32_t hash_opts;    /* PKB_HASH_* for pkb_flow_hash(); cleared by fill_begin */
    uint32_t no_hash;      /* 1: no flow hash, descriptors say PKTIPC_F_NO_HASH; cleared too */
};

typedef struct pkb_src pkb_src;

/* Opens a pcap or pcapng file with nanosecond timestamps; NULL with the
 * reason in errbuf (PKB_ERRBUF_SIZE bytes) on failure. */
pkb_src *pkb_src_open_file(const char *path, char *errbuf);
int pkb_src_linktype(const pkb_src *s);
uint32_t pkb_src_snaplen(const pkb_src *s);
/* Ticks per second of a classic pcap file's timestamps (10^6 or 10^9); 0
 * for pcapng, whose interfaces each have their own. */
uint32_t pkb_src_ts_resolution(const pkb_src *s);
/* Capture time of the pending packet, or of the next one to be read (which
 * it reads); INT64_MAX at the end of the source or on error. */
int64_t pkb_src_peek_ts(pkb_src *s);
const char *pkb_src_error(const pkb_src *s);
uint32_t pkb_src_pending_caplen(const pkb_src *s);
void pkb_src_close(pkb_src *s);

void pkb_fill_begin(struct pkb_fill *f, uint8_t *slab, uint32_t slab_size, uint32_t iface);
/* Copies packets from s into f's slab until one of PKB_FILL_* stops it,
 * or max_pkts are in the slab (PKB_FILL_FULL). */
int pkb_src_fill(pkb_src *s, struct pkb_fill *f, int64_t ts_limit, uint32_t max_pkts);

/* Computes the flow hash of each of the n descriptors at pkts filled
 * without one (PKTIPC_F_NO_HASH), from its frame at slab + data_off; the
 * flag stays (pkts may be a copy: the slab's own descriptors are unchanged). */
void pkb_pkts_hash(const uint8_t *slab, struct pktipc_pkt *pkts, uint32_t n, uint32_t hash_opts);
/* Hashes f's slab, filled with no_hash, before it is published: then every
 * descriptor has its hash, and no flag says otherwise. */
void pkb_fill_hash(struct pkb_fill *f);

/* Writes the batch record of a filled slab, seq last. */
void pkb_batch_publish(struct pktipc_batch_rec *rec, uint32_t slab, uint32_t gen,
                          uint64_t seq, const struct pkb_fill *f,
                          uint64_t kernel_drops, uint64_t broker_drops);
