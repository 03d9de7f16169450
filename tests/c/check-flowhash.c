/*
 * The flow hash over every packet of the captures named on the command
 * line, on their own link type, as Ethernet and as raw IP, every prefix of
 * each in a heap block of exactly its size, mutated copies, and random
 * frames on every link type it reads; then the selection helpers over a
 * batch. Built with AddressSanitizer and UndefinedBehaviorSanitizer: a read
 * at or past caplen is an error. Prints the hash calls, the packets the
 * members selected and those pktipc_share_counts counted.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pcap/pcap.h>
#include "pktipc_shm.h"
#include "harness.h"
#include "flowhash.h"

static const uint32_t LINKTYPES[] = {0, 1, 101, 104, 108, 113, 127, 228, 229, 276};
static unsigned long calls;

/* Every prefix of the frame, each in a heap block of exactly its size. */
static void every_prefix(const uint8_t *data, uint32_t caplen, uint32_t linktype)
{
    for (uint32_t n = 0; n <= caplen; n++) {
        uint8_t *copy = malloc(n ? n : 1);
        memcpy(copy, data, n);
        for (uint32_t opts = 0; opts <= PKB_HASH_TUNNELS; opts++) {
            pkb_flow_hash(copy, n, linktype, opts);
            calls++;
        }
        free(copy);
    }
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        char err[PCAP_ERRBUF_SIZE];
        pcap_t *p = pcap_open_offline(argv[i], err);
        if (!p)
            continue;
        struct pcap_pkthdr *h;
        const u_char *data;
        while (pcap_next_ex(p, &h, &data) == 1) {
            every_prefix(data, h->caplen, (uint32_t)pcap_datalink(p) == 12 ? 101
                         : (uint32_t)pcap_datalink(p));
            every_prefix(data, h->caplen, 1);
            every_prefix(data, h->caplen, 101);
            /* and mutated */
            uint8_t buf[512];
            uint32_t n = h->caplen < sizeof(buf) ? h->caplen : sizeof(buf);
            for (int m = 0; m < 20 && n; m++) {
                memcpy(buf, data, n);
                for (int j = 0; j < 4; j++)
                    buf[next_rand() % n] = (uint8_t)next_rand();
                every_prefix(buf, n, LINKTYPES[next_rand() % 10]);
            }
        }
        pcap_close(p);
    }
    /* random frames on every link type */
    for (int r = 0; r < 20000; r++) {
        uint8_t buf[128];
        uint32_t n = next_rand() % sizeof(buf);
        for (uint32_t j = 0; j < n; j++)
            buf[j] = (uint8_t)next_rand();
        if (n > 14 && r % 2) { buf[12] = 0x08; buf[13] = 0; buf[14] = 0x45; }
        every_prefix(buf, n, LINKTYPES[r % 10]);
    }
    /* the selection helpers over a batch */
    struct pktipc_pkt pkts[257];
    uint32_t members[5] = {3, 1, 4, 15, 9}, out[257], counts[5] = {0};
    uint8_t mask[33];
    for (int i = 0; i < 257; i++)
        pkts[i].hash = next_rand();
    for (int i = 0; i < 33; i++)
        mask[i] = (uint8_t)next_rand();
    mask[32] &= 1;
    uint32_t total = 0;
    for (int m = 0; m < 5; m++)
        total += pktipc_select(pkts, 257, mask, members, 5, members[m], out);
    pktipc_share_counts(pkts, 257, mask, members, 5, counts);
    uint32_t sum = counts[0] + counts[1] + counts[2] + counts[3] + counts[4];
    printf("%lu %u %u\n", calls, total, sum);
    return total == sum && total > 0 ? 0 : 1;
}
