/*
 * What a client's filter costs per packet in C: every packet of a capture,
 * laid in slabs as the broker lays them (descriptors, then the frames),
 * tested by pktipc_filter_run (shm/pktipc_filter.c: one call per slab)
 * beside libpcap's own loop of pcap_offline_filter over the same frames
 * (one call per packet, the headers pcap_next_ex would give at hand), and
 * a loop that only reads the bytes "tcp port 80" looks at (ethertype,
 * protocol, ports): the floor set by memory, the same for both.
 *
 *   gcc -O2 -I../../shm -o filter_cost filter_cost.c ../../shm/pktipc_filter.c -lpcap
 *   filter_cost FILE EXPR [PASSES]  ->  one JSON line, nanoseconds per packet
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pcap/pcap.h>

#include "pktipc_shm.h"
#include "pktipc_linktype.h"
#include "pktipc_filter.h"

#define SLAB (1u << 20)         /* the broker's default slab */

struct slab {
    uint8_t *mem;
    struct pcap_pkthdr *hdrs;
    uint32_t n;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: filter_cost FILE EXPR [PASSES]\n");
        return 2;
    }
    int passes = argc > 3 ? atoi(argv[3]) : 15;
    if (passes < 1 || passes > 99)
        passes = 15;
    char err[PCAP_ERRBUF_SIZE];
    pcap_t *p = pcap_open_offline(argv[1], err);
    if (!p) {
        fprintf(stderr, "filter_cost: %s\n", err);
        return 1;
    }
    uint32_t linktype = (uint32_t)pktipc_linktype_of_dlt(pcap_datalink(p));
    char ferr[PKTIPC_FILTER_ERRBUF_SIZE];
    struct pktipc_filter *f;
    struct bpf_program prog;
    if (pktipc_filter_new(argv[2], &linktype, 1, &f, ferr) < 0 ||
        pcap_compile(p, &prog, argv[2], 1, PCAP_NETMASK_UNKNOWN) < 0) {
        fprintf(stderr, "filter_cost: %s\n", ferr);
        return 1;
    }
    /* Slabs as the broker fills them: room for the descriptors of frames of
     * this file's smallest size, the frames after them. */
    size_t ns = 0, cap = 64;
    struct slab *slabs = calloc(cap, sizeof(*slabs));
    uint64_t total = 0;
    uint32_t per_slab = 0, used = 0;
    struct pcap_pkthdr *h;
    const u_char *data;
    while (pcap_next_ex(p, &h, &data) == 1) {
        if (!per_slab)
            per_slab = SLAB / (PKTIPC_DESC_SIZE + ((h->caplen + PKTIPC_FRAME_ALIGN - 1) &
                                                   ~(PKTIPC_FRAME_ALIGN - 1)));
        struct slab *s = ns ? &slabs[ns - 1] : NULL;
        uint32_t room = (h->caplen + PKTIPC_FRAME_ALIGN - 1) & ~(PKTIPC_FRAME_ALIGN - 1);
        if (!s || s->n == per_slab || used + room > SLAB) {
            if (ns == cap)
                slabs = realloc(slabs, (cap *= 2) * sizeof(*slabs));
            s = &slabs[ns++];
            s->mem = aligned_alloc(4096, SLAB);
            s->hdrs = calloc(per_slab, sizeof(*s->hdrs));
            s->n = 0;
            used = per_slab * PKTIPC_DESC_SIZE;
        }
        if (used + room > SLAB)
            continue;
        struct pktipc_pkt *d = &((struct pktipc_pkt *)s->mem)[s->n];
        memset(d, 0, sizeof(*d));
        d->data_off = used;
        d->caplen = h->caplen;
        d->wirelen = h->len;
        d->linktype = (uint16_t)linktype;
        memcpy(s->mem + used, data, h->caplen);
        s->hdrs[s->n++] = *h;
        used += room;
        total++;
    }
    pcap_close(p);
    uint32_t *out = malloc(per_slab * sizeof(*out));
    double t[3][99];
    uint64_t matched[3] = {0, 0, 0};
    for (int pass = 0; pass < passes; pass++) {
        for (int k = 0; k < 3; k++) {
            int mode = pass & 1 ? 2 - k : k;    /* the order reversed every other pass */
            uint64_t m = 0;
            double t0 = now();
            for (size_t i = 0; i < ns; i++) {
                const struct slab *s = &slabs[i];
                const struct pktipc_pkt *pk = (const struct pktipc_pkt *)s->mem;
                if (mode == 0) {
                    m += pktipc_filter_run(f, s->mem, pk, NULL, s->n, out);
                } else if (mode == 1) {
                    for (uint32_t j = 0; j < s->n; j++)
                        m += pcap_offline_filter(&prog, &s->hdrs[j],
                                                 s->mem + pk[j].data_off) != 0;
                } else {
                    for (uint32_t j = 0; j < s->n; j++) {
                        const volatile uint8_t *fr = s->mem + pk[j].data_off;
                        m += (uint64_t)(fr[12] + fr[23] + fr[34] + fr[36] + fr[54]);
                    }
                }
            }
            t[mode][pass] = (now() - t0) * 1e9 / (double)total;
            matched[mode] = m;
        }
    }
    if (matched[0] != matched[1]) {
        fprintf(stderr, "filter_cost: pktipc matched %llu, libpcap %llu\n",
                (unsigned long long)matched[0], (unsigned long long)matched[1]);
        return 1;
    }
    for (int mode = 0; mode < 3; mode++)
        qsort(t[mode], (size_t)passes, sizeof(double), cmp);
    printf("{\"packets\": %llu, \"matched\": %llu, \"per_batch\": %u, \"passes\": %d, "
           "\"pktipc_filter_run_ns\": %.3f, \"pcap_offline_filter_ns\": %.3f, "
           "\"read_only_ns\": %.3f, \"pktipc_min_ns\": %.3f, \"libpcap_min_ns\": %.3f, "
           "\"read_only_min_ns\": %.3f}\n",
           (unsigned long long)total, (unsigned long long)matched[0], per_slab, passes,
           t[0][passes / 2], t[1][passes / 2], t[2][passes / 2], t[0][0], t[1][0], t[2][0]);
    pktipc_filter_free(f);
    pcap_freecode(&prog);
    return 0;
}
