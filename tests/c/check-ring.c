/*
 * Live capture (afpacket.c) under the sanitizers: opens a TPACKET_V3 ring
 * on an interface, says "ready", then copies what arrives into slabs, each a
 * heap block of exactly its size, until COUNT packets came or 10 seconds
 * passed. Every slab must hold together (harness.h) and every descriptor
 * carry the flow hash of its bytes; each packet is printed, for the test
 * that sent the frames to compare with what it sent:
 *
 *     check-ring IFACE SNAPLEN VLAN_REINSERT SLAB_SIZE MAX_PKTS COUNT BLOCK_SIZE BLOCKS
 *
 * prints "ready", then one line per packet, "caplen wirelen flags vlan_tci
 * linktype ts_ns hex-bytes", then "kernel packets N drops N".
 */
#define _GNU_SOURCE
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "pktipc_shm.h"
#include "ingest.h"
#include "flowhash.h"
#include "afpacket.h"
#include "harness.h"

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * INT64_C(1000000000) + t.tv_nsec;
}

static uint32_t print_slab(const struct pkb_fill *f, uint32_t linktype)
{
    const struct pktipc_pkt *d = (const struct pktipc_pkt *)f->slab;
    for (uint32_t i = 0; i < f->count; i++) {
        const uint8_t *bytes = f->slab + d[i].data_off;
        CHECK(d[i].linktype == linktype, "packet %u: link type %u", i, d[i].linktype);
        CHECK(d[i].hash == pkb_flow_hash(bytes, d[i].caplen, linktype, f->hash_opts),
              "packet %u: the hash is not its bytes'", i);
        printf("%u %u %u %u %u %lld ", d[i].caplen, d[i].wirelen, d[i].flags, d[i].vlan_tci,
               d[i].linktype, (long long)d[i].ts_ns);
        for (uint32_t j = 0; j < d[i].caplen; j++)
            printf("%02x", bytes[j]);
        printf("\n");
    }
    return f->count;
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: check-ring IFACE SNAPLEN VLAN_REINSERT SLAB_SIZE MAX_PKTS "
                "COUNT BLOCK_SIZE BLOCKS\n");
        return 2;
    }
    uint32_t arg[9];
    for (int i = 2; i < argc; i++)
        arg[i] = (uint32_t)strtoul(argv[i], NULL, 0);
    struct pkb_ring_opts o = {
        .ifname = argv[1], .filter = "", .snaplen = arg[2], .vlan_reinsert = (uint8_t)arg[3],
        .block_size = arg[7], .block_count = arg[8], .block_timeout_ms = 2,
        .fanout_id = PKB_FANOUT_NONE, .promisc = 1,
    };
    const uint32_t slab_size = arg[4], max_pkts = arg[5], want = arg[6];
    int err = 0;
    char errbuf[PKB_ERRBUF_SIZE] = "";
    pkb_ring *r = pkb_ring_open(&o, &err, errbuf);
    if (!r) {
        fprintf(stderr, "check-ring: %s (%d)\n", errbuf, err);
        return 2;
    }
    const uint32_t linktype = pkb_ring_linktype(r);
    printf("ready\n");
    fflush(stdout);

    uint32_t got = 0, slabs = 0;
    const int64_t deadline = now_ns() + 10 * INT64_C(1000000000);
    while (got < want && now_ns() < deadline) {
        struct pkb_fill f;
        pkb_fill_begin(&f, malloc(slab_size), slab_size, slabs % 3);
        CHECK(f.slab, "out of memory");
        f.hash_opts = slabs % 2 ? PKB_HASH_TUNNELS : 0;
        int status;
        while ((status = pkb_ring_fill(r, &f, max_pkts)) == PKB_FILL_EMPTY && !f.count &&
               now_ns() < deadline) {
            struct pollfd p = {.fd = pkb_ring_fd(r), .events = POLLIN};
            CHECK(poll(&p, 1, 100) >= 0, "poll");
            CHECK(!(p.revents & POLLERR), "socket error %d", pkb_ring_sock_error(r));
        }
        CHECK(status == PKB_FILL_FULL || status == PKB_FILL_EMPTY, "pkb_ring_fill: %d", status);
        check_slab(&f, max_pkts);
        got += print_slab(&f, linktype);
        slabs++;
        free(f.slab);
    }
    struct pktipc_iface e = {0};
    CHECK(pkb_ring_stats(r, &e) == 0, "pkb_ring_stats");
    printf("kernel packets %llu drops %llu\n", (unsigned long long)e.kernel_packets,
           (unsigned long long)e.kernel_drops);
    pkb_ring_close(r);
    return 0;
}
