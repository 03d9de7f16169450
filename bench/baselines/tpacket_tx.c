/*
 * tpacket_tx IFACE FILE LOOPS BYPASS: a capture file's frames out of IFACE,
 * LOOPS times, as fast as the kernel takes them, through a TPACKET_V2 TX
 * ring of its own (1024 frames of 2048 bytes; PACKET_QDISC_BYPASS if BYPASS
 * is 1): the ceiling of sending through a packet socket. The file (classic
 * pcap, Ethernet) is read into memory first. Fills every free slot, then one
 * send() (blocking: it returns once the kernel has taken the frames), and
 * so on; at the end waits until every slot is free again. Prints
 * "sent N bytes B secs S", S from the first frame to the last one taken.
 */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAMES 1024
#define FRAME_SIZE 2048
#define HDR TPACKET_ALIGN(sizeof(struct tpacket2_hdr))

struct rec { uint32_t len; const uint8_t *data; };

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* The records of a classic pcap file (either byte order, µs or ns). */
static struct rec *read_pcap(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)size);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size)
        die("read");
    fclose(f);
    uint32_t magic;
    memcpy(&magic, buf, 4);
    int swap = magic == 0xd4c3b2a1 || magic == 0x4d3cb2a1;
    size_t cap = 1024, k = 0;
    struct rec *r = malloc(cap * sizeof(*r));
    for (long off = 24; off + 16 <= size;) {
        uint32_t len;
        memcpy(&len, buf + off + 8, 4);
        if (swap)
            len = __builtin_bswap32(len);
        if (off + 16 + (long)len > size)
            break;
        if (k == cap)
            r = realloc(r, (cap *= 2) * sizeof(*r));
        r[k].len = len;
        r[k++].data = buf + off + 16;
        off += 16 + (long)len;
    }
    *n = k;
    return r;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: tpacket_tx IFACE FILE LOOPS BYPASS\n");
        return 2;
    }
    size_t n;
    struct rec *r = read_pcap(argv[2], &n);
    long loops = atol(argv[3]);
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0)
        die("socket");
    int v = TPACKET_V2, bypass = atoi(argv[4]);
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof(v)) < 0)
        die("PACKET_VERSION");
    if (bypass && setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &bypass, sizeof(bypass)) < 0)
        die("PACKET_QDISC_BYPASS");
    struct tpacket_req req = {.tp_block_size = FRAME_SIZE * 32, .tp_block_nr = FRAMES / 32,
                              .tp_frame_size = FRAME_SIZE, .tp_frame_nr = FRAMES};
    if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof(req)) < 0)
        die("PACKET_TX_RING");
    uint8_t *ring = mmap(NULL, (size_t)FRAMES * FRAME_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                         fd, 0);
    if (ring == MAP_FAILED)
        die("mmap");
    struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = 0,
                             .sll_ifindex = (int)if_nametoindex(argv[1])};
    if (!ll.sll_ifindex || bind(fd, (struct sockaddr *)&ll, sizeof(ll)) < 0)
        die("bind");
    unsigned long long sent = 0, bytes = 0, total = (unsigned long long)n * (unsigned long long)loops;
    unsigned slot = 0;
    size_t i = 0;
    double t0 = now();
    while (sent < total) {
        unsigned filled = 0;
        for (;;) {
            struct tpacket2_hdr *h = (void *)(ring + (size_t)slot * FRAME_SIZE);
            if (sent + filled == total || h->tp_status != TP_STATUS_AVAILABLE)
                break;
            memcpy((uint8_t *)h + HDR, r[i].data, r[i].len);
            h->tp_len = r[i].len;
            bytes += r[i].len;
            __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
            slot = (slot + 1) % FRAMES;
            i = (i + 1) % n;
            filled++;
        }
        if (send(fd, NULL, 0, 0) < 0)
            die("send");
        sent += filled;
        if (!filled) {                  /* ring full: wait for a slot */
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            poll(&p, 1, 100);
        }
    }
    for (unsigned k = 0; k < FRAMES; k++) {         /* every frame taken */
        struct tpacket2_hdr *h = (void *)(ring + (size_t)k * FRAME_SIZE);
        while (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) & (TP_STATUS_SEND_REQUEST |
                                                                   TP_STATUS_SENDING)) {
            send(fd, NULL, 0, 0);
        }
        if (h->tp_status & TP_STATUS_WRONG_FORMAT) {
            fprintf(stderr, "frame %u: wrong format\n", k);
            return 1;
        }
    }
    printf("sent %llu bytes %llu secs %.6f\n", sent, bytes, now() - t0);
    return 0;
}
