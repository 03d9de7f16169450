/*
 * The capture-file writer's hot path (pktipc/_client/writer.py): the records
 * of a slab's packets, pcap or pcapng, built in one call (files, and
 * pcap-over-ip's streams), and a capture filter run over them. Declarations
 * only (cffi's cdef() reads this file as it is, so: integer #defines and
 * prototypes, nothing else).
 */

/* capw_records() formats */
#define CAPW_PCAP            0   /* nanosecond pcap records */
#define CAPW_PCAPNG          1   /* pcapng enhanced packet blocks */
#define CAPW_PCAP_US         2   /* microsecond pcap records */

#define CAPW_ERRBUF_SIZE     256

/* Writes the records of packets pkts[idx[i]], i < n, of a slab of slab_len
 * bytes, in that order, into out: pcap records (seconds, and nanoseconds or
 * microseconds, the sub-second part truncated), or pcapng enhanced packet
 * blocks of interface ifid[i] (ifid is read for pcapng only), with an
 * epb_flags option (direction and reception type) when the descriptor
 * knows the direction. With snaplen > 0 a record holds at most snaplen bytes
 * of its packet, its wire length kept (0: all of them). Returns the bytes
 * written, or -1, with nothing meaningful in out, if a descriptor points
 * outside the slab, a time is one the format cannot hold (before 1970; in
 * pcap, from 2106-02-07 06:28:16 UTC on: the caller checks first, to say
 * which), fmt is none of the above, or the records would not fit in out_len
 * bytes. */
int64_t capw_records(uint32_t fmt, uint32_t snaplen, uint8_t *out, uint64_t out_len,
                     const uint8_t *slab, uint64_t slab_len,
                     const struct pktipc_pkt *pkts, const uint32_t *idx, uint32_t n,
                     const uint32_t *ifid);

typedef struct capw_filter capw_filter;

/* A filter in tcpdump syntax, compiled by libpcap for frames of `linktype`
 * read from a file (a VLAN tag is matched in the bytes, where pktipc puts it
 * back by default). NULL with libpcap's message in errbuf
 * (CAPW_ERRBUF_SIZE bytes) if it does not compile. */
capw_filter *capw_filter_new(uint32_t linktype, uint32_t snaplen, const char *expr,
                             char *errbuf);
void capw_filter_free(capw_filter *f);

/* Writes to out, in order, those of idx[0..n) whose packets the filter
 * accepts; returns how many, or -1 if a descriptor points outside the slab. */
int64_t capw_filter_run(const capw_filter *f, const uint8_t *slab, uint64_t slab_len,
                        const struct pktipc_pkt *pkts, const uint32_t *idx, uint32_t n,
                        uint32_t *out);
