/*
 * Traffic generator for the live benchmarks: UDP/IPv4 frames of one size
 * over F flows, sent through an AF_PACKET socket with sendmmsg, bypassing
 * the qdisc, at a given rate (0: as fast as the kernel takes them).
 *
 *   gen IFACE COUNT SIZE RATE [FLOWS]
 *
 * Prints "sent N seconds S" on stdout. Run it only on an interface of a
 * namespace of one's own.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BURST 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void make_frame(uint8_t *f, unsigned size, unsigned flow)
{
    static const uint8_t dst[6] = {2, 0, 0, 0, 0, 0x99}, src[6] = {2, 0, 0, 0, 0, 2};
    memset(f, 0, size);
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x08;
    uint8_t *ip = f + 14;
    unsigned iplen = size - 14;
    ip[0] = 0x45;
    ip[2] = (uint8_t)(iplen >> 8);
    ip[3] = (uint8_t)iplen;
    ip[8] = 64;
    ip[9] = 17;
    ip[12] = 10, ip[13] = 0, ip[14] = (uint8_t)(flow >> 8), ip[15] = (uint8_t)flow;
    ip[16] = 10, ip[17] = 1, ip[18] = 0, ip[19] = 1;
    uint8_t *udp = ip + 20;
    unsigned sport = 1024 + flow, ulen = iplen - 20;
    udp[0] = (uint8_t)(sport >> 8), udp[1] = (uint8_t)sport;
    udp[2] = 0x04, udp[3] = 0xd2;
    udp[4] = (uint8_t)(ulen >> 8), udp[5] = (uint8_t)ulen;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: gen IFACE COUNT SIZE RATE [FLOWS]\n");
        return 2;
    }
    const char *ifname = argv[1];
    unsigned long count = strtoul(argv[2], NULL, 0);
    unsigned size = (unsigned)strtoul(argv[3], NULL, 0);
    double rate = strtod(argv[4], NULL);
    unsigned flows = argc > 5 ? (unsigned)strtoul(argv[5], NULL, 0) : 256;
    if (size < 60 || size > 1514 || !flows) {
        fprintf(stderr, "gen: SIZE must be 60..1514, FLOWS positive\n");
        return 2;
    }
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) {
        perror("gen: socket");
        return 1;
    }
    int one = 1;
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(ifname)};
    if (!sll.sll_ifindex || bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("gen: bind");
        return 1;
    }
    uint8_t(*frames)[1514] = calloc(flows, sizeof(*frames));
    for (unsigned i = 0; i < flows; i++)
        make_frame(frames[i], size, i);
    struct mmsghdr msgs[BURST];
    struct iovec iov[BURST];
    memset(msgs, 0, sizeof(msgs));

    double start = now();
    unsigned long sent = 0;
    while (sent < count) {
        unsigned n = count - sent < BURST ? (unsigned)(count - sent) : BURST;
        if (rate > 0) {
            double due = start + (double)sent / rate;
            double wait = due - now();
            if (wait > 0) {
                struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
            unsigned per_ms = (unsigned)(rate / 1000) + 1;
            if (n > per_ms)
                n = per_ms;
        }
        for (unsigned i = 0; i < n; i++) {
            iov[i].iov_base = frames[(sent + i) % flows];
            iov[i].iov_len = size;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r < 0) {
            if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR)
                continue;
            perror("gen: sendmmsg");
            return 1;
        }
        sent += (unsigned long)r;
    }
    printf("sent %lu seconds %.6f\n", sent, now() - start);
    free(frames);
    return 0;
}
