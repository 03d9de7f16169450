/*
 * The ceiling for copying a capture file into shared memory once: what the
 * broker's C ingest does per packet (libpcap pcap_next_ex, then a 32-byte
 * descriptor and the frame into a ring of slabs), with no Python, no control
 * messages and no client. Slabs as the broker lays them out: descriptors
 * grow up from the start, frames (8-byte aligned) down from the end.
 *
 *   gcc -O2 -o pcap_copy pcap_copy.c -lpcap
 *   pcap_copy FILE [PASSES [SLABS [SLAB_BYTES]]]  ->  one JSON line
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <pcap/pcap.h>

struct desc {   /* the shape of struct pktipc_pkt */
    uint64_t ts_ns;
    uint32_t data_off, caplen, wirelen, hash;
    uint16_t iface, linktype, vlan_tci, flags;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 5) {
        fprintf(stderr, "usage: %s FILE [PASSES [SLABS [SLAB_BYTES]]]\n", argv[0]);
        return 2;
    }
    int passes = argc > 2 ? atoi(argv[2]) : 1;
    size_t nslabs = argc > 3 ? strtoul(argv[3], NULL, 0) : 64;
    size_t slab_size = argc > 4 ? strtoul(argv[4], NULL, 0) : 1 << 20;
    /* Shared and touched once beforehand, as the broker's segment is after a
     * first pass over its ring. */
    uint8_t *ring = mmap(NULL, nslabs * slab_size, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (ring == MAP_FAILED) {
        perror("pcap_copy: mmap");
        return 1;
    }
    memset(ring, 0, nslabs * slab_size);

    uint64_t n = 0, caplen = 0, batches = 0;
    size_t slab = 0;
    uint32_t count = 0, low = (uint32_t)slab_size;
    double t0 = now();
    for (int i = 0; i < passes; i++) {
        char err[PCAP_ERRBUF_SIZE] = "";
        pcap_t *p = pcap_open_offline_with_tstamp_precision(argv[1], PCAP_TSTAMP_PRECISION_NANO,
                                                            err);
        if (!p) {
            fprintf(stderr, "pcap_copy: %s\n", err);
            return 1;
        }
        struct pcap_pkthdr *h;
        const u_char *data;
        int r;
        while ((r = pcap_next_ex(p, &h, &data)) == 1) {
            uint32_t room = (h->caplen + 7) & ~7u;
            if ((count + 1) * sizeof(struct desc) + room > low) {
                slab = (slab + 1) % nslabs;
                count = 0;
                low = (uint32_t)slab_size;
                batches++;
            }
            uint8_t *base = ring + slab * slab_size;
            low -= room;
            memcpy(base + low, data, h->caplen);
            struct desc *d = (struct desc *)base + count++;
            d->ts_ns = (uint64_t)h->ts.tv_sec * 1000000000u + (uint64_t)h->ts.tv_usec;
            d->data_off = low;
            d->caplen = h->caplen;
            d->wirelen = h->len;
            d->hash = 0;
            d->iface = 0;
            d->linktype = 1;
            d->vlan_tci = 0;
            d->flags = 0;
            n++;
            caplen += h->caplen;
        }
        if (r != PCAP_ERROR_BREAK) {
            fprintf(stderr, "pcap_copy: %s\n", pcap_geterr(p));
            return 1;
        }
        pcap_close(p);
    }
    double t1 = now();
    printf("{\"packets\": %llu, \"caplen_sum\": %llu, \"seconds\": %.9f, \"batches\": %llu}\n",
           (unsigned long long)n, (unsigned long long)caplen, t1 - t0,
           (unsigned long long)batches + 1);
    return 0;
}
