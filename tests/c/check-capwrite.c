/*
 * The capture-file writer's C (pktipc/_client/engine/capwrite.c) over
 * random batches, in every format, with and without a snap length, each slab
 * and each output in a heap block of exactly its size: under
 * AddressSanitizer a byte read or written past either is an error. A
 * descriptor that points past its slab, a negative time, a pcap time past
 * 2106 and an output one byte short must be refused; the filter runs over
 * random frames. Prints the records written and the calls refused.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "pktipc_shm.h"
#include "harness.h"
#include "capwrite.h"

#define PCAP_TS_END (((uint64_t)1 << 32) * 1000000000u)

static uint64_t record_size(uint32_t fmt, uint32_t snaplen, const struct pktipc_pkt *p)
{
    uint32_t caplen = snaplen && p->caplen > snaplen ? snaplen : p->caplen;
    if (fmt != CAPW_PCAPNG)
        return 16 + (uint64_t)caplen;
    uint32_t dir = (p->flags & PKTIPC_F_DIR_MASK) >> PKTIPC_F_DIR_SHIFT;
    int known = dir >= PKTIPC_DIR_HOST && dir <= PKTIPC_DIR_OUTGOING;
    return 32 + (uint64_t)caplen + (-caplen & 3u) + (known ? 12 : 0);
}

int main(void)
{
    unsigned long written = 0, refused = 0, accepted = 0;
    char err[CAPW_ERRBUF_SIZE];
    capw_filter *f = capw_filter_new(1, 65535, "udp or (tcp and port 80) or vlan 7", err);
    if (!f) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    for (int round = 0; round < 20000; round++) {
        uint32_t n = 1 + next_rand() % 64, off = 32 * n;
        struct pktipc_pkt *pkts = calloc(n, sizeof *pkts);
        uint32_t *idx = malloc(n * sizeof *idx), *ifid = malloc(n * sizeof *ifid);
        uint32_t *sel = malloc(n * sizeof *sel);
        for (uint32_t i = 0; i < n; i++) {
            pkts[i].caplen = next_rand() % 300;
            pkts[i].wirelen = pkts[i].caplen + next_rand() % 3;
            pkts[i].data_off = off;
            pkts[i].ts_ns = (int64_t)((((uint64_t)next_rand() << 30) ^ next_rand())
                                      % PCAP_TS_END);
            pkts[i].flags = (uint16_t)((next_rand() % 8) << PKTIPC_F_DIR_SHIFT);
            off += (pkts[i].caplen + 7) & ~7u;
            idx[i] = n - 1 - i;             /* any order */
            ifid[i] = next_rand() % 4;
        }
        uint64_t slab_len = off;
        uint8_t *slab = malloc(slab_len ? slab_len : 1);
        for (uint64_t i = 0; i < slab_len; i++)
            slab[i] = (uint8_t)next_rand();
        for (uint32_t i = 0; i < n; i++) {     /* half of them IPv4 UDP, as far as they go */
            uint8_t *fr = slab + pkts[i].data_off;
            if (pkts[i].caplen >= 24 && next_rand() % 2) {
                fr[12] = 0x08, fr[13] = 0x00, fr[14] = 0x45, fr[23] = 17;
                fr[20] = fr[21] = 0;
            }
        }
        uint32_t snaplen = next_rand() % 2 ? 0 : 1 + next_rand() % 300;
        for (uint32_t fmt = CAPW_PCAP; fmt <= CAPW_PCAP_US; fmt++) {
            uint64_t size = 0;
            for (uint32_t i = 0; i < n; i++)
                size += record_size(fmt, snaplen, &pkts[i]);
            uint8_t *out = malloc(size);
            if (capw_records(fmt, snaplen, out, size, slab, slab_len, pkts, idx, n,
                             ifid) != (int64_t)size) {
                fprintf(stderr, "round %d: a batch of %u not written whole\n", round, n);
                return 1;
            }
            written += n;
            /* One byte short: refused, nothing past the end touched. */
            if (capw_records(fmt, snaplen, out, size - 1, slab, slab_len, pkts, idx, n,
                             ifid) != -1) {
                fprintf(stderr, "round %d: a short output taken\n", round);
                return 1;
            }
            refused++;
            free(out);
        }
        /* A descriptor past the slab, a time before 1970, a pcap time past
         * 2106, an unknown format: refused. */
        struct pktipc_pkt keep = pkts[n / 2];
        pkts[n / 2].data_off = (uint32_t)slab_len - (next_rand() % 2 ? 0 : pkts[n / 2].caplen / 2);
        pkts[n / 2].caplen += 1;
        uint8_t *big = malloc(1 << 16);
        if (capw_records(CAPW_PCAPNG, 0, big, 1 << 16, slab, slab_len, pkts, idx, n, ifid) != -1 ||
            capw_filter_run(f, slab, slab_len, pkts, idx, n, sel) != -1) {
            fprintf(stderr, "round %d: a descriptor past its slab taken\n", round);
            return 1;
        }
        pkts[n / 2] = keep;
        pkts[0].ts_ns = -1;
        if (capw_records(CAPW_PCAP, 0, big, 1 << 16, slab, slab_len, pkts, idx, n, ifid) != -1) {
            fprintf(stderr, "round %d: a negative time taken\n", round);
            return 1;
        }
        pkts[0].ts_ns = (int64_t)PCAP_TS_END;
        if (capw_records(CAPW_PCAP_US, 0, big, 1 << 16, slab, slab_len, pkts, idx, n,
                         ifid) != -1 ||
            capw_records(CAPW_PCAPNG + 2, 0, big, 1 << 16, slab, slab_len, pkts, idx, n,
                         ifid) != -1) {
            fprintf(stderr, "round %d: a pcap time past 2106 or an unknown format taken\n",
                    round);
            return 1;
        }
        refused += 4;
        int64_t k = capw_filter_run(f, slab, slab_len, pkts, idx, n, sel);
        if (k < 0 || k > n) {
            fprintf(stderr, "round %d: the filter said %lld\n", round, (long long)k);
            return 1;
        }
        accepted += (unsigned long)k;
        free(big);
        free(slab);
        free(pkts);
        free(idx);
        free(ifid);
        free(sel);
    }
    capw_filter_free(f);
    if (capw_filter_new(1, 65535, "udp and", err) != NULL || !strstr(err, "bad filter")) {
        fprintf(stderr, "a bad filter compiled\n");
        return 1;
    }
    printf("%lu %lu %lu\n", written, refused, accepted);
    return 0;
}
