/*
 * The ceiling for live capture: one process reading a TPACKET_V3 ring as
 * directly as it can (what Suricata's AF_PACKET mode or libpcap do), touching
 * the first byte of every packet. No copy, no broker, nobody else served.
 *
 *   tpacket_read IFACE BLOCK_SIZE BLOCKS TIMEOUT_MS
 *
 * Prints "ready" on stderr once bound; runs until SIGTERM or SIGINT, then
 * drains the ring and prints
 * "packets N bytes B kernel_packets K kernel_drops D freezes F".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int s) { (void)s; stop = 1; }

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: tpacket_read IFACE BLOCK_SIZE BLOCKS TIMEOUT_MS\n");
        return 2;
    }
    unsigned bs = (unsigned)strtoul(argv[2], NULL, 0), nb = (unsigned)strtoul(argv[3], NULL, 0);
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    int v = TPACKET_V3;
    setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof(v));
    struct tpacket_req3 req = {.tp_block_size = bs, .tp_block_nr = nb, .tp_frame_size = 2048,
                               .tp_frame_nr = bs / 2048 * nb,
                               .tp_retire_blk_tov = (unsigned)strtoul(argv[4], NULL, 0)};
    if (setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) < 0) {
        perror("PACKET_RX_RING");
        return 1;
    }
    uint8_t *map = mmap(NULL, (size_t)bs * nb, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = (int)if_nametoindex(argv[1])};
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("bind");
        return 1;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    fprintf(stderr, "ready\n");

    uint64_t packets = 0, bytes = 0, touched = 0;
    unsigned cur = 0;
    int draining = 0;
    for (;;) {
        struct tpacket_block_desc *b = (struct tpacket_block_desc *)(map + (size_t)cur * bs);
        if (!(__atomic_load_n(&b->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER)) {
            if (draining)
                break;
            if (stop) {     /* one more look, once the last block has retired */
                usleep(2000 * (unsigned)req.tp_retire_blk_tov + 20000);
                draining = 1;
                continue;
            }
            struct pollfd p = {.fd = fd, .events = POLLIN};
            poll(&p, 1, 100);
            continue;
        }
        struct tpacket3_hdr *h = (struct tpacket3_hdr *)((uint8_t *)b + b->hdr.bh1.offset_to_first_pkt);
        for (unsigned i = 0; i < b->hdr.bh1.num_pkts; i++) {
            touched += ((uint8_t *)h)[h->tp_mac];
            bytes += h->tp_snaplen;
            packets++;
            h = (struct tpacket3_hdr *)((uint8_t *)h + h->tp_next_offset);
        }
        __atomic_store_n(&b->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        cur = (cur + 1) % nb;
    }
    struct tpacket_stats_v3 st;
    socklen_t len = sizeof(st);
    getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &len);
    printf("packets %llu bytes %llu kernel_packets %u kernel_drops %u freezes %u touched %llu\n",
           (unsigned long long)packets, (unsigned long long)bytes, st.tp_packets, st.tp_drops,
           st.tp_freeze_q_cnt, (unsigned long long)(touched & 1));
    return 0;
}
