/*
 * What the flow hash costs per packet: every packet of a capture held in
 * memory, hashed (pkb_flow_hash, without and with tunnel hashing) beside
 * a loop that only reads the same bytes.
 *
 *   gcc -O2 -I../../shm -I../../pktipc/_broker/engine -o flowhash_cost flowhash_cost.c \
 *       ../../pktipc/_broker/engine/flowhash.c -lpcap
 *   flowhash_cost FILE [PASSES]  ->  one JSON line, nanoseconds per packet
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pcap/pcap.h>

#include "flowhash.h"

#define ROOM 128    /* bytes kept of each frame: the headers */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    int passes = argc > 2 ? atoi(argv[2]) : 5;
    char err[PCAP_ERRBUF_SIZE];
    pcap_t *p = pcap_open_offline(argv[1], err);
    if (!p) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    uint32_t linktype = (uint32_t)pcap_datalink(p);
    size_t n = 0, cap = 1024;
    uint8_t *frames = malloc(cap * ROOM);
    uint32_t *lens = malloc(cap * sizeof(*lens));
    struct pcap_pkthdr *h;
    const u_char *data;
    while (pcap_next_ex(p, &h, &data) == 1) {
        if (n == cap) {
            cap *= 2;
            frames = realloc(frames, cap * ROOM);
            lens = realloc(lens, cap * sizeof(*lens));
        }
        lens[n] = h->caplen < ROOM ? h->caplen : ROOM;
        memcpy(frames + n * ROOM, data, lens[n]);
        n++;
    }
    pcap_close(p);
    double ns[3];
    uint32_t sink = 0;
    for (int mode = 0; mode < 3; mode++) {
        double t0 = now();
        for (int r = 0; r < passes; r++)
            for (size_t i = 0; i < n; i++) {
                const uint8_t *f = frames + i * ROOM;
                sink ^= mode == 0 ? (uint32_t)f[lens[i] ? lens[i] - 1 : 0] + lens[i]
                                  : pkb_flow_hash(f, lens[i], linktype,
                                                     mode == 2 ? PKB_HASH_TUNNELS : 0);
            }
        ns[mode] = (now() - t0) * 1e9 / ((double)n * passes);
    }
    printf("{\"packets\": %zu, \"ns_read\": %.2f, \"ns_hash\": %.2f, \"ns_hash_tunnels\": %.2f,"
           " \"sink\": %u}\n", n, ns[0], ns[1], ns[2], sink);
    free(frames);
    free(lens);
    return 0;
}
