/*
 * The clients' filter (shm/pktipc_filter.c) against libpcap's own
 * pcap_offline_filter: every packet of every capture given, laid in slabs
 * as the broker lays them, for each expression, through pktipc_filter_run
 * (all of a batch, and a share given by `in`, written over itself), must
 * match exactly when libpcap says it does; a packet of a source the filter
 * was not compiled for matches nothing; a refused expression gives
 * libpcap's message, naming the link type when it is one of several.
 *
 *   check-filter FILE...   -> "files packets matches" on stdout; exit 0
 */
#include <pcap/pcap.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "pktipc_shm.h"
#include "pktipc_filter.h"
#include "pktipc_linktype.h"

#define SLAB (1u << 20)
#define BATCH 256u

static const char *const EXPRS[] = {
    "", "tcp", "udp port 53", "vlan 100 and tcp", "ip6", "not arp", "tcp port 80",
    "ip[0] & 0xf != 5", "greater 200", "icmp or icmp6", "vlan and udp",
    "ether broadcast", "tcp[tcpflags] & tcp-syn != 0",
};
#define NEXPRS (sizeof(EXPRS) / sizeof(EXPRS[0]))

struct batch {
    uint8_t *slab;
    struct pktipc_pkt *pkts;
    struct pcap_pkthdr *hdrs;
    uint32_t n, used;
};

static uint64_t total_packets, total_matches;

/* Tests one batch with every compiled program against pcap_offline_filter. */
static void check_batch(const struct batch *b, struct pktipc_filter *const *fs,
                        struct bpf_program *progs, int dlt)
{
    uint32_t out[BATCH], in[BATCH];
    for (size_t e = 0; e < NEXPRS; e++) {
        if (!fs[e])
            continue;           /* libpcap cannot compile it for this link type */
        uint32_t m = pktipc_filter_run(fs[e], b->slab, b->pkts, NULL, b->n, out);
        uint32_t j = 0;
        for (uint32_t i = 0; i < b->n; i++) {
            int want = pcap_offline_filter(&progs[e], &b->hdrs[i],
                                           b->slab + b->pkts[i].data_off) != 0;
            if (want) {
                CHECK(j < m && out[j] == i, "'%s' (DLT %d): packet %u matches for libpcap",
                      EXPRS[e], dlt, i);
                j++;
            } else {
                CHECK(j >= m || out[j] != i, "'%s' (DLT %d): packet %u does not match "
                      "for libpcap", EXPRS[e], dlt, i);
            }
        }
        CHECK(j == m, "'%s': %u matches, libpcap %u", EXPRS[e], m, j);
        total_matches += m;
        /* A share: the odd packets, given in `in` and written over it. */
        uint32_t k = 0;
        for (uint32_t i = 1; i < b->n; i += 2)
            in[k++] = i;
        uint32_t ms = pktipc_filter_run(fs[e], b->slab, b->pkts, in, k, in);
        uint32_t want = 0;
        for (uint32_t t = 0; t < m; t++)
            if (out[t] & 1) {
                CHECK(want < ms && in[want] == out[t], "'%s': share differs at %u", EXPRS[e],
                      out[t]);
                want++;
            }
        CHECK(want == ms, "'%s': share has %u matches, should have %u", EXPRS[e], ms, want);
    }
}

static void check_file(const char *path)
{
    char err[PCAP_ERRBUF_SIZE];
    pcap_t *p = pcap_open_offline(path, err);
    if (!p)
        return;             /* not a capture libpcap reads: nothing to compare with */
    int dlt = pcap_datalink(p);
    uint32_t linktype = (uint32_t)pktipc_linktype_of_dlt(dlt);   /* a descriptor's */
    struct pktipc_filter *fs[NEXPRS];
    struct bpf_program progs[NEXPRS];
    char ferr[PKTIPC_FILTER_ERRBUF_SIZE];
    for (size_t e = 0; e < NEXPRS; e++) {
        int ours = pktipc_filter_new(EXPRS[e], &linktype, 1, &fs[e], ferr);
        int theirs = pcap_compile(p, &progs[e], EXPRS[e], 1, PCAP_NETMASK_UNKNOWN);
        CHECK((ours < 0) == (theirs < 0), "'%s' on DLT %d: compiled %d, libpcap %d",
              EXPRS[e], dlt, ours, theirs);
        if (ours < 0) {
            char want[PKTIPC_FILTER_ERRBUF_SIZE];
            snprintf(want, sizeof(want), "filter '%s': %s", EXPRS[e], pcap_geterr(p));
            CHECK(strcmp(ferr, want) == 0, "message '%s', libpcap's '%s'", ferr, want);
            CHECK(fs[e] == NULL, "a refused filter is NULL");
        }
    }
    struct batch b = {
        .slab = aligned_alloc(64, SLAB),
        .pkts = NULL,
        .hdrs = calloc(BATCH, sizeof(struct pcap_pkthdr)),
    };
    CHECK(b.slab && b.hdrs, "out of memory");
    b.pkts = (struct pktipc_pkt *)b.slab;
    uint32_t data0 = BATCH * PKTIPC_DESC_SIZE;
    b.used = data0;
    struct pcap_pkthdr *h;
    const u_char *data;
    int r;
    while ((r = pcap_next_ex(p, &h, &data)) == 1) {
        if (b.n == BATCH || b.used + h->caplen > SLAB) {
            check_batch(&b, fs, progs, dlt);
            b.n = 0;
            b.used = data0;
        }
        if (h->caplen > SLAB - data0)
            continue;
        struct pktipc_pkt *d = &b.pkts[b.n];
        memset(d, 0, sizeof(*d));
        d->data_off = b.used;
        d->caplen = h->caplen;
        d->wirelen = h->len;
        d->linktype = (uint16_t)linktype;
        d->iface = 0;
        memcpy(b.slab + b.used, data, h->caplen);
        b.hdrs[b.n] = *h;
        b.used += (h->caplen + 7u) & ~7u;
        b.n++;
        total_packets++;
    }
    if (b.n)
        check_batch(&b, fs, progs, dlt);
    /* A packet of a source the filter knows nothing of matches nothing. */
    if (b.n && fs[0]) {
        uint32_t out[1];
        b.pkts[0].iface = 1;
        CHECK(pktipc_filter_run(fs[0], b.slab, b.pkts, NULL, 1, out) == 0,
              "a packet of an unknown source matched");
    }
    for (size_t e = 0; e < NEXPRS; e++) {
        pktipc_filter_free(fs[e]);
        if (fs[e])
            pcap_freecode(&progs[e]);
    }
    free(b.slab);
    free(b.hdrs);
    pcap_close(p);
}

/* Several sources: one program per link type, each packet by its source's;
 * an expression one of them cannot take is refused naming its link type. */
static void check_sources(void)
{
    const uint32_t lts[] = {1, 228, 1, 229};       /* Ethernet, IPv4, Ethernet, IPv6 */
    struct pktipc_filter *f;
    char err[PKTIPC_FILTER_ERRBUF_SIZE];
    /* "ip" cannot apply to IPv6 alone: refused, naming it, first or not. */
    CHECK(pktipc_filter_new("ip", lts, 4, &f, err) < 0 && !f, "ip with an IPv6 source");
    CHECK(strstr(err, "filter 'ip': ") == err && strstr(err, "(link type IPV6)"), "%s", err);
    CHECK(pktipc_filter_new("ip", lts + 3, 1, &f, err) < 0 && !strstr(err, "(link type "),
          "ip on IPv6 alone: %s", err);
    const uint32_t v6first[] = {229, 1};
    CHECK(pktipc_filter_new("ip", v6first, 2, &f, err) < 0 && strstr(err, "(link type IPV6)"),
          "ip with an IPv6 source first: %s", err);
    CHECK(pktipc_filter_new("tcp", lts, 4, &f, err) == 0, "%s", err);
    /* A TCP/IPv4 packet (a bare header) from source 1, the same after an
     * Ethernet header from sources 0 and 2, and from source 3 (IPv6) the
     * IPv4 header, read by the IPv6 program: no TCP there. */
    uint8_t *slab = aligned_alloc(64, 4096);
    struct pktipc_pkt *pkts = (struct pktipc_pkt *)slab;
    memset(slab, 0, 4096);
    static const uint8_t ip4[20] = {0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6};
    uint32_t off = 4 * PKTIPC_DESC_SIZE;
    for (uint16_t i = 0; i < 4; i++) {
        uint32_t len = lts[i] == 1 ? 34 : 20;
        uint8_t *fr = slab + off;
        if (lts[i] == 1) {
            fr[12] = 0x08;      /* ethertype IPv4 */
            memcpy(fr + 14, ip4, sizeof(ip4));
        } else {
            memcpy(fr, ip4, sizeof(ip4));
        }
        pkts[i] = (struct pktipc_pkt){.data_off = off, .caplen = len, .wirelen = len,
                                      .iface = i, .linktype = (uint16_t)lts[i]};
        off += 64;
    }
    uint32_t out[4];
    uint32_t m = pktipc_filter_run(f, slab, pkts, NULL, 4, out);
    CHECK(m == 3 && out[0] == 0 && out[1] == 1 && out[2] == 2,
          "tcp over Ethernet, IPv4 and IPv6 sources: %u matches", m);
    pktipc_filter_free(f);
    CHECK(pktipc_filter_new("ether host 1:2:3:4:5:6", lts, 4, &f, err) < 0 && !f,
          "ether host on an IPv4 source");
    CHECK(strstr(err, "filter 'ether host 1:2:3:4:5:6': ") == err && strstr(err, "(link type "),
          "message: %s", err);
    CHECK(pktipc_filter_new("tcp port", lts, 1, &f, err) < 0 && !f, "a syntax error");
    CHECK(strstr(err, "filter 'tcp port': ") == err && !strstr(err, "(link type "),
          "message: %s", err);
    CHECK(pktipc_filter_new("tcp", lts, 0, &f, err) == 0, "no sources: %s", err);
    CHECK(pktipc_filter_run(f, slab, pkts, NULL, 4, out) == 0, "no sources, no match");
    pktipc_filter_free(f);
    pktipc_filter_free(NULL);
    free(slab);
}

int main(int argc, char **argv)
{
    check_sources();
    for (int i = 1; i < argc; i++)
        check_file(argv[i]);
    printf("%d %llu %llu\n", argc - 1, (unsigned long long)total_packets,
           (unsigned long long)total_matches);
    return 0;
}
