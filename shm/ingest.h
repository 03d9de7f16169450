/*
 * Broker-side helpers compiled into the pktipc extension: declarations only
 * (cffi's cdef() reads this file as it is). Consumers never need these.
 */

/* pktipc_src_fill() results */
#define PKTIPC_FILL_FULL    1   /* the slab cannot take the next packet; it stays pending */
#define PKTIPC_FILL_EOF     2   /* the source has no more packets */
#define PKTIPC_FILL_LIMIT   3   /* the next packet is later than ts_limit; it stays pending */
#define PKTIPC_FILL_ERROR   4   /* the source failed: pktipc_src_error() says why */
#define PKTIPC_FILL_TOOBIG  5   /* the next packet does not fit even an empty slab */

#define PKTIPC_ERRBUF_SIZE  512

/* Broker-private cursor over the slab being filled. Descriptors grow up from
 * the slab's start, frames grow down from its end, until they would meet. */
struct pktipc_fill {
    uint8_t *slab;
    uint32_t slab_size;
    uint32_t count;        /* descriptors written */
    uint32_t data_low;     /* lowest byte of frame data; slab_size when empty */
    uint32_t iface;        /* written into every descriptor */
    uint64_t bytes;        /* captured bytes written */
    int64_t first_ts_ns;
    int64_t last_ts_ns;
    uint32_t hash_opts;    /* PKTIPC_HASH_* for pktipc_flow_hash(); cleared by fill_begin */
};

typedef struct pktipc_src pktipc_src;

/* Opens a pcap or pcapng file with nanosecond timestamps; NULL with the
 * reason in errbuf (PKTIPC_ERRBUF_SIZE bytes) on failure. */
pktipc_src *pktipc_src_open_file(const char *path, char *errbuf);
int pktipc_src_linktype(const pktipc_src *s);
uint32_t pktipc_src_snaplen(const pktipc_src *s);
/* Ticks per second of a classic pcap file's timestamps (10^6 or 10^9); 0
 * for pcapng, whose interfaces each have their own. */
uint32_t pktipc_src_ts_resolution(const pktipc_src *s);
/* Capture time of the pending packet, or of the next one to be read (which
 * it reads); INT64_MAX at the end of the source or on error. */
int64_t pktipc_src_peek_ts(pktipc_src *s);
const char *pktipc_src_error(const pktipc_src *s);
uint32_t pktipc_src_pending_caplen(const pktipc_src *s);
void pktipc_src_close(pktipc_src *s);

void pktipc_fill_begin(struct pktipc_fill *f, uint8_t *slab, uint32_t slab_size, uint32_t iface);
/* Copies packets from s into f's slab until one of PKTIPC_FILL_* stops it,
 * or max_pkts are in the slab (PKTIPC_FILL_FULL). */
int pktipc_src_fill(pktipc_src *s, struct pktipc_fill *f, int64_t ts_limit, uint32_t max_pkts);

/* Writes the batch record of a filled slab, seq last. */
void pktipc_batch_publish(struct pktipc_batch_rec *rec, uint32_t slab, uint32_t gen,
                          uint64_t seq, const struct pktipc_fill *f,
                          uint64_t kernel_drops, uint64_t broker_drops);
