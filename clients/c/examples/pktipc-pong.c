/*
 * pktipc-pong: a host that exists only as a pktipc client. It answers ARP
 * requests for an IPv4 address and ICMP echo requests to it, on the
 * interface each came in on, through a broker that captures and sends
 * there (pktipc serve -i IFACE --tx):
 *
 *     pktipc-pong [-n NAME] [-m MAC] SERVER ADDRESS
 *
 * so that `ping ADDRESS` from the wire gets its replies. A reply is built
 * from the request as it lies in the broker's segment: one copy into this
 * client's TX area, then edits in place (addresses swapped, the ICMP type
 * and the checksums). MAC defaults to 02:00 followed by ADDRESS's bytes.
 * It runs until Ctrl-C (or SIGTERM) and prints what it answered.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <pktipc.h>

#define ETH_HLEN 14
#define ETH_ARP 0x0806
#define ETH_IP 0x0800

static volatile sig_atomic_t stop;
static uint8_t mac[6];
static uint8_t addr[4];
static unsigned long long arps, echoes, failed;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: pktipc-pong [-n NAME] [-m MAC] SERVER ADDRESS\n");
    exit(2);
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* The Internet checksum of n bytes. */
static uint16_t checksum(const uint8_t *p, size_t n)
{
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < n; i += 2)
        sum += get16(p + i);
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Where the frame's EtherType stands, past its VLAN tags (kept in replies). */
static size_t ether_type_at(const uint8_t *f, size_t len)
{
    size_t off = 12;
    while (off + 4 <= len && (get16(f + off) == 0x8100 || get16(f + off) == 0x88a8))
        off += 4;
    return off;
}

/* Room for the reply, a copy of the request: NULL if none (counted). */
static uint8_t *reply_to(pktipc_client *c, const struct pktipc_pkt *p, const uint8_t *data)
{
    uint8_t *f;
    int r = pktipc_tx_alloc(c, p->caplen, p->iface, 1000, &f);
    if (r < 0) {
        if (!failed++)
            fprintf(stderr, "pktipc-pong: %s\n", pktipc_geterr(c));
        return NULL;
    }
    memcpy(f, data, p->caplen);
    memcpy(f, f + 6, 6);            /* back to whom it came from */
    memcpy(f + 6, mac, 6);
    return f;
}

static void answer(pktipc_client *c, const struct pktipc_pkt *p, const uint8_t *d)
{
    size_t len = p->caplen;
    if (p->linktype != 1 || p->caplen != p->wirelen ||
        pktipc_pkt_direction(p) == PKTIPC_DIR_OUTGOING || len < ETH_HLEN)
        return;
    size_t et = ether_type_at(d, len), l3 = et + 2;
    if (l3 > len)
        return;
    const uint8_t *a = d + l3;
    if (get16(d + et) == ETH_ARP && len >= l3 + 28 && get16(a) == 1 && get16(a + 2) == ETH_IP &&
        a[4] == 6 && a[5] == 4 && get16(a + 6) == 1 && !memcmp(a + 24, addr, 4)) {
        uint8_t *f = reply_to(c, p, d);
        if (!f)
            return;
        uint8_t *r = f + l3;
        put16(r + 6, 2);                    /* a reply */
        memcpy(r + 18, a + 8, 10);          /* to the asker's MAC and address */
        memcpy(r + 8, mac, 6);              /* from ours */
        memcpy(r + 14, addr, 4);
        if (pktipc_tx_send(c, f, (uint32_t)len) == 0)
            arps++;
        return;
    }
    if (get16(d + et) != ETH_IP || len < l3 + 20)
        return;
    size_t ihl = (size_t)(a[0] & 0x0f) * 4, total = get16(a + 2);
    if ((a[0] >> 4) != 4 || ihl < 20 || total < ihl + 8 || l3 + total > len || a[9] != 1 ||
        memcmp(a + 16, addr, 4) || (get16(a + 6) & 0x3fff) || a[ihl] != 8 || a[ihl + 1] != 0 ||
        checksum(a, ihl))
        return;
    uint8_t *f = reply_to(c, p, d);
    if (!f)
        return;
    uint8_t *ip = f + l3;
    memcpy(ip + 16, a + 12, 4);             /* to the asker */
    memcpy(ip + 12, addr, 4);               /* from us */
    ip[8] = 64;
    put16(ip + 10, 0);
    put16(ip + 10, checksum(ip, ihl));
    uint8_t *icmp = ip + ihl;
    icmp[0] = 0;                            /* echo reply: the rest as it came */
    put16(icmp + 2, 0);
    put16(icmp + 2, checksum(icmp, total - ihl));
    if (pktipc_tx_send(c, f, (uint32_t)len) == 0)
        echoes++;
}

int main(int argc, char **argv)
{
    char name[64], errbuf[PKTIPC_ERRBUF_SIZE];
    snprintf(name, sizeof(name), "pong-%d", (int)getpid());
    struct pktipc_opts o = {.sz = sizeof(o), .name = name, .timeout_ms = -1,
                            .reconnect_ms = -1, .errbuf = errbuf};
    const char *mac_arg = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "n:m:")) != -1) {
        switch (opt) {
        case 'n': o.name = optarg; break;
        case 'm': mac_arg = optarg; break;
        default: usage();
        }
    }
    if (argc - optind != 2)
        usage();
    o.server = argv[optind];
    if (inet_pton(AF_INET, argv[optind + 1], addr) != 1) {
        fprintf(stderr, "pktipc-pong: not an IPv4 address: %s\n", argv[optind + 1]);
        return 2;
    }
    if (mac_arg) {
        unsigned m[6];
        char tail;
        if (sscanf(mac_arg, "%x:%x:%x:%x:%x:%x%c", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5],
                   &tail) != 6 || (m[0] | m[1] | m[2] | m[3] | m[4] | m[5]) > 0xff || m[0] & 1) {
            fprintf(stderr, "pktipc-pong: not a unicast MAC address: %s\n", mac_arg);
            return 2;
        }
        for (int i = 0; i < 6; i++)
            mac[i] = (uint8_t)m[i];
    } else {
        mac[0] = 0x02;
        memcpy(mac + 2, addr, 4);
    }
    pktipc_client *c;
    int r = pktipc_open(&o, &c);
    if (r < 0) {
        fprintf(stderr, "pktipc-pong: %s\n", errbuf);
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    struct pktipc_batch b;
    while (!stop && ((r = pktipc_next_batch(c, &b, 200)) >= 0 || r == -PKTIPC_EINTR)) {
        if (r <= 0)
            continue;
        for (uint32_t i = 0; i < b.count; i++)
            answer(c, &b.pkts[i], pktipc_batch_data(&b, &b.pkts[i]));
        pktipc_release_batch(c, &b);
        /* Handed over now, not waited for: the next batch may be on its way. */
        if ((r = pktipc_tx_flush(c, 0)) < 0 && r != -PKTIPC_EREFUSED)
            break;
    }
    int status = 0;
    if (r < 0 && r != -PKTIPC_EINTR && r != -PKTIPC_EEOS) {
        fprintf(stderr, "pktipc-pong: %s\n", pktipc_geterr(c));
        status = 1;
    } else if (pktipc_tx_flush(c, 1000) < 0) {
        fprintf(stderr, "pktipc-pong: %s\n", pktipc_geterr(c));
    }
    printf("answered %llu ARP requests, %llu echo requests; %llu not answered\n", arps, echoes,
           failed);
    pktipc_close(c);
    return status;
}
