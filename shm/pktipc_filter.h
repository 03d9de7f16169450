/*
 * A client's packet filter, in tcpdump's syntax, compiled by libpcap and run
 * over a batch in one call: the one implementation of filters, for
 * libpktipc (opts.filter) and the Python client (connect(filter=...)).
 * cffi reads this file as it is (prototypes only); pktipc_filter.c holds
 * the code.
 *
 * A filter is compiled for a broker's sources: once for each link type
 * among them (pcap_compile on a dead handle of that type, as tcpdump -r
 * compiles for its file), so a packet is tested by the program of its
 * source's link type. It sees a frame as the client gets it (a VLAN tag
 * the kernel stripped is back in the bytes, unless the broker runs with
 * --no-vlan-reinsert).
 */
#define PKTIPC_FILTER_ERRBUF_SIZE 320

struct pktipc_filter;

/* Compiles `expr` for sources of the given LINKTYPE_* values (linktypes[i]
 * is source i's): 0 with *out set, or -1 with *out NULL and libpcap's
 * message in errbuf (PKTIPC_FILTER_ERRBUF_SIZE bytes). As tcpdump -r
 * refuses an expression its file's link type cannot take ("ip" on IPv6
 * alone, "tcp" on D-Bus), so is one any source's link type cannot take;
 * when the sources have several link types, the message names it. */
int pktipc_filter_new(const char *expr, const uint32_t *linktypes, uint32_t n,
                      struct pktipc_filter **out, char *errbuf);

/* Frees a filter; NULL-safe. */
void pktipc_filter_free(struct pktipc_filter *f);

/* Tests packets of a slab: those at pkts[in[j]] for j < k (in NULL:
 * pkts[0..k)), their bytes at slab + data_off (pkts are checked copies:
 * every frame within the slab, or within the frame area past the slabs).
 * Writes to out[] the indexes (into pkts) of those that match, in order,
 * and returns how many; out may be `in`. A packet of a source the filter
 * was not compiled for does not match. */
uint32_t pktipc_filter_run(const struct pktipc_filter *f, const uint8_t *slab,
                           const struct pktipc_pkt *pkts, const uint32_t *in, uint32_t k,
                           uint32_t *out);

/* The DLT_* value (what libpcap's API speaks) of a LINKTYPE_* value (what
 * descriptors and capture files carry). */
int pktipc_linktype_dlt(int linktype);
