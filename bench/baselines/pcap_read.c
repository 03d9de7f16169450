/*
 * The ceiling for reading a capture file: one process, libpcap, no broker.
 * Loops pcap_next_ex() and touches every packet (caplen, timestamp, first
 * byte), as the broker's own ingest does before copying.
 *
 *   gcc -O2 -o pcap_read pcap_read.c -lpcap
 *   pcap_read FILE [PASSES]  ->  one JSON line: packets, caplen sum, seconds
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <pcap/pcap.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s FILE [PASSES]\n", argv[0]);
        return 2;
    }
    int passes = argc == 3 ? atoi(argv[2]) : 1;
    uint64_t n = 0, caplen = 0, ts = 0, bytes0 = 0;
    double t0 = now();
    for (int i = 0; i < passes; i++) {
        char err[PCAP_ERRBUF_SIZE] = "";
        pcap_t *p = pcap_open_offline_with_tstamp_precision(argv[1], PCAP_TSTAMP_PRECISION_NANO,
                                                            err);
        if (!p) {
            fprintf(stderr, "pcap_read: %s\n", err);
            return 1;
        }
        struct pcap_pkthdr *h;
        const u_char *data;
        int r;
        while ((r = pcap_next_ex(p, &h, &data)) == 1) {
            n++;
            caplen += h->caplen;
            ts ^= (uint64_t)h->ts.tv_sec * 1000000000u + (uint64_t)h->ts.tv_usec;
            bytes0 += h->caplen ? data[0] : 0;
        }
        if (r != PCAP_ERROR_BREAK) {
            fprintf(stderr, "pcap_read: %s\n", pcap_geterr(p));
            return 1;
        }
        pcap_close(p);
    }
    double t1 = now();
    printf("{\"packets\": %llu, \"caplen_sum\": %llu, \"seconds\": %.9f, \"check\": %llu}\n",
           (unsigned long long)n, (unsigned long long)caplen, t1 - t0,
           (unsigned long long)(ts ^ bytes0));
    return 0;
}
