/* Broker-side sending: clients' TX areas into TPACKET_V2 TX rings, one call per batch. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pktipc_shm.h"
#include "fill.h"        /* with ingest.h: PKB_ERRBUF_SIZE */
#include "afpacket.h"    /* PKB_RING_E* */
#include "sigbus.h"
#include "tx.h"

#define ETH_HLEN_ 14
#define VLAN_HLEN_ 4
/* Where a TPACKET_V2 TX frame's bytes start (without PACKET_TX_HAS_OFF). */
#define TX_DATA_OFF (TPACKET2_HDRLEN - sizeof(struct sockaddr_ll))
#define TX_BLOCK (64u << 10)
/* Every store before it is made before the area is read: a SIGBUS there
 * leaves *res and the rings as they were. */
#define BARRIER() __asm__ volatile("" ::: "memory")

struct pkb_txring {
    int fd;
    int ifindex;
    char ifname[IFNAMSIZ];
    uint32_t hard_header;       /* link-layer header: 14 for Ethernet, 0 for raw IP */
    uint32_t mtu;
    uint8_t *map;
    size_t map_size;
    uint32_t frame_size, frame_count;
    uint64_t head;              /* frames copied in, ever: the next goes to head % count */
    uint64_t taken;             /* of those, taken by the kernel (always in order) */
};

struct pkb_txarea {
    uint8_t *base;
    uint64_t size;
    struct pktipc_tx_header h;  /* checked copy, the only one read */
};

static pkb_txring *fail(pkb_txring *r, int *err, int code, char *errbuf, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static pkb_txring *fail(pkb_txring *r, int *err, int code, char *errbuf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, PKB_ERRBUF_SIZE, fmt, ap);
    va_end(ap);
    *err = code;
    pkb_txring_close(r);
    return NULL;
}

static struct tpacket2_hdr *frame_at(const pkb_txring *r, uint64_t i)
{
    return (struct tpacket2_hdr *)(r->map + (size_t)(i % r->frame_count) * r->frame_size);
}

static int read_mtu(pkb_txring *r)
{
    struct ifreq ifr = {0};
    memcpy(ifr.ifr_name, r->ifname, sizeof(r->ifname));
    if (ioctl(r->fd, SIOCGIFMTU, &ifr) < 0)
        return -1;
    r->mtu = ifr.ifr_mtu > 0 ? (uint32_t)ifr.ifr_mtu : 0;
    return 0;
}

pkb_txring *pkb_txring_open(const struct pkb_txring_opts *o, int *err, char *errbuf)
{
    pkb_txring *r = calloc(1, sizeof(*r));
    if (!r)
        return fail(r, err, PKB_RING_ESYS, errbuf, "out of memory");
    r->fd = -1;
    r->map = MAP_FAILED;
    if (strlen(o->ifname) >= IFNAMSIZ || !(r->ifindex = (int)if_nametoindex(o->ifname)))
        return fail(r, err, PKB_RING_ENODEV, errbuf, "%s: no such interface", o->ifname);
    snprintf(r->ifname, sizeof(r->ifname), "%s", o->ifname);
    /* Protocol 0: the socket receives nothing; it only sends. */
    r->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (r->fd < 0)
        return fail(r, err, errno == EPERM || errno == EACCES ? PKB_RING_EPERM : PKB_RING_ESYS,
                    errbuf, "sending on %s needs CAP_NET_RAW: %s", o->ifname, strerror(errno));
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", o->ifname);
    if (ioctl(r->fd, SIOCGIFHWADDR, &ifr) < 0 || read_mtu(r) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: %s", o->ifname, strerror(errno));
    switch (ifr.ifr_hwaddr.sa_family) {
    case ARPHRD_ETHER:
    case ARPHRD_LOOPBACK:
        r->hard_header = ETH_HLEN_;
        break;
    case ARPHRD_NONE:
        r->hard_header = 0;
        break;
    default:
        return fail(r, err, PKB_RING_EUNSUPP, errbuf,
                    "%s: sending on link type ARPHRD %u is not supported (Ethernet and raw IP "
                    "are)", o->ifname, ifr.ifr_hwaddr.sa_family);
    }
    /* A frame the kernel refuses anyway is dropped and the ring goes on
     * (else it would stop there for good); the broker refuses, and
     * counts, every frame the kernel would, before it copies it. */
    int one = 1, version = TPACKET_V2;
    if (setsockopt(r->fd, SOL_PACKET, PACKET_VERSION, &version, sizeof(version)) < 0 ||
        setsockopt(r->fd, SOL_PACKET, PACKET_LOSS, &one, sizeof(one)) < 0 ||
        (o->qdisc_bypass &&
         setsockopt(r->fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0))
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: TX ring options: %s", o->ifname,
                    strerror(errno));
    /* Frames of a power of two that hold the largest frame the interface
     * may send (MTU, link-layer header, a VLAN tag), up to the largest slot. */
    uint32_t want = (uint32_t)TX_DATA_OFF + r->mtu + r->hard_header + VLAN_HLEN_;
    r->frame_size = 2048;
    while (r->frame_size < want && r->frame_size < PKTIPC_TX_MAX_FRAME_SIZE)
        r->frame_size <<= 1;
    uint32_t block = r->frame_size > TX_BLOCK ? r->frame_size : TX_BLOCK;
    uint32_t per_block = block / r->frame_size;
    uint32_t blocks = (o->frame_count + per_block - 1) / per_block;
    r->frame_count = blocks * per_block;
    struct tpacket_req req = {.tp_block_size = block, .tp_block_nr = blocks,
                              .tp_frame_size = r->frame_size, .tp_frame_nr = r->frame_count};
    if (setsockopt(r->fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof(req)) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: a TX ring of %u frames of %u bytes: %s",
                    o->ifname, r->frame_count, r->frame_size, strerror(errno));
    r->map_size = (size_t)block * blocks;
    r->map = mmap(NULL, r->map_size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (r->map == MAP_FAILED)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: mapping the TX ring: %s", o->ifname,
                    strerror(errno));
    /* Room in the socket's send buffer for a ring's worth of frames in
     * flight: beyond it the kernel takes no more until some are sent. */
    int sndbuf = (int)(r->map_size < (1u << 30) ? r->map_size : (1u << 30));
    if (setsockopt(r->fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
        setsockopt(r->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = 0,
                              .sll_ifindex = r->ifindex};
    if (bind(r->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: bind: %s", o->ifname, strerror(errno));
    return r;
}

int pkb_txring_fd(const pkb_txring *r) { return r->fd; }

uint32_t pkb_txring_max_len(const pkb_txring *r)
{
    uint32_t room = r->frame_size - (uint32_t)TX_DATA_OFF;
    uint32_t len = r->mtu + r->hard_header + (r->hard_header ? VLAN_HLEN_ : 0);
    return len < room ? len : room;
}

int pkb_txring_refresh(pkb_txring *r) { return read_mtu(r); }

uint32_t pkb_txring_pending(const pkb_txring *r) { return (uint32_t)(r->head - r->taken); }

void pkb_txring_flush(pkb_txring *r, struct pkb_tx_io *io)
{
    if (r->head == r->taken)
        return;
    if (send(r->fd, NULL, 0, MSG_DONTWAIT) < 0 && errno != EINTR)
        io->error = errno;
    /* The kernel takes frames in ring order, each from SEND_REQUEST to
     * SENDING (or AVAILABLE: sent, or refused with PACKET_LOSS); one it has
     * not taken is still SEND_REQUEST. Make sure its status is read before
     * the frame is counted as the kernel's. */
    while (r->taken < r->head &&
           !(__atomic_load_n(&frame_at(r, r->taken)->tp_status, __ATOMIC_ACQUIRE) &
             TP_STATUS_SEND_REQUEST)) {
        r->taken++;
        io->taken++;
    }
}

void pkb_txring_close(pkb_txring *r)
{
    if (!r)
        return;
    if (r->map != MAP_FAILED)
        munmap(r->map, r->map_size);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

pkb_txarea *pkb_txarea_open(int fd, uint64_t size, char *errbuf)
{
    if (size < PKTIPC_TX_HEADER_SIZE || size > ((uint64_t)1 << 40)) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "a TX area of %llu bytes", (unsigned long long)size);
        return NULL;
    }
    pkb_txarea *a = calloc(1, sizeof(*a));
    if (!a) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "out of memory");
        return NULL;
    }
    a->size = size;
    a->base = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (a->base == MAP_FAILED) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "mapping the TX area: %s", strerror(errno));
        free(a);
        return NULL;
    }
    /* The header too may meet a page the client cut off since its size was read. */
    sigjmp_buf jb;
    volatile int ok = 0;
    pkb_bus_install();
    if (!sigsetjmp(jb, 0)) {
        pkb_bus_guard = &jb;
        ok = pktipc_tx_attach(a->base, size, &a->h) == 0;
    }
    pkb_bus_guard = NULL;
    if (!ok) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "not a TX area of layout %d, laid out as its header "
                 "says, within its %llu bytes", PKTIPC_TX_LAYOUT_VERSION,
                 (unsigned long long)size);
        pkb_txarea_close(a);
        return NULL;
    }
    return a;
}

uint32_t pkb_txarea_frame_count(const pkb_txarea *a) { return a->h.frame_count; }
uint32_t pkb_txarea_frame_size(const pkb_txarea *a) { return a->h.frame_size; }

void pkb_txarea_close(pkb_txarea *a)
{
    if (!a)
        return;
    munmap(a->base, a->size);
    free(a);
}

/* Why a ring would not send a frame of `len` bytes whose first bytes are at
 * `data` (the ring's copy), or -1 if it would: the kernel's rule (the MTU
 * and the link-layer header; on Ethernet 4 bytes more for an 802.1Q tag),
 * so that what the kernel refuses is refused, and counted, here. */
static int refusal(const pkb_txring *r, uint32_t len, const uint8_t *data)
{
    if (len < (r->hard_header ? r->hard_header : 1))
        return PKB_TX_SHORT;
    if (len > pkb_txring_max_len(r))
        return PKB_TX_LONG;
    if (r->hard_header && len > r->mtu + r->hard_header && !(data[12] == 0x81 && data[13] == 0))
        return PKB_TX_LONG;
    return -1;
}

static void refuse(struct pkb_tx_result *res, uint32_t j, int why, uint32_t len, uint32_t iface)
{
    if (!res->refused[0] && !res->refused[1] && !res->refused[2] && !res->refused[3] &&
        !res->refused[4]) {
        res->first_refused = j;
        res->first_reason = (uint32_t)why;
        res->first_len = len;
        res->first_iface = iface;
    }
    res->refused[why]++;
    res->done = j + 1;
}

/* The copy loop, under the SIGBUS guard; progress is kept in *res and in
 * the rings, which a longjmp leaves as they were at the fault. */
static int copy(pkb_txarea *a, uint64_t first, uint32_t n, pkb_txring **rings, uint32_t nrings,
                struct pkb_tx_io *io, struct pkb_tx_result *res)
{
    uint32_t mask = a->h.frame_count - 1;
    for (uint32_t j = res->done; j < n; j++) {
        uint32_t slot = (uint32_t)((first + j) & mask);
        struct pktipc_tx_desc d;
        BARRIER();
        memcpy(&d, pktipc_tx_desc(a->base, &a->h, slot), sizeof(d));   /* read once */
        if (!d.len) {
            refuse(res, j, PKB_TX_EMPTY, 0, d.iface);
            continue;
        }
        if (d.iface >= nrings) {
            refuse(res, j, PKB_TX_NOIFACE, d.len, d.iface);
            continue;
        }
        pkb_txring *r = rings[d.iface];
        if (!r) {
            refuse(res, j, PKB_TX_NOTX, d.len, d.iface);
            continue;
        }
        if (d.len > a->h.frame_size || d.len > r->frame_size - (uint32_t)TX_DATA_OFF) {
            refuse(res, j, PKB_TX_LONG, d.len, d.iface);
            continue;
        }
        struct tpacket2_hdr *h = frame_at(r, r->head);
        /* Make sure the kernel is done with the frame (its status, then its
         * bytes) before we write into it. */
        uint32_t st = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
        if (st & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING)) {
            res->full_iface = d.iface;
            return PKB_TX_FULL;
        }
        uint8_t *dst = (uint8_t *)h + TX_DATA_OFF;
        BARRIER();
        memcpy(dst, pktipc_tx_frame(a->base, &a->h, slot), d.len);
        int why = refusal(r, d.len, dst);       /* checked on our copy, not the client's */
        if (why >= 0) {
            refuse(res, j, why, d.len, d.iface);
            continue;
        }
        h->tp_len = d.len;
        h->tp_snaplen = d.len;
        /* Make sure the frame and its length are written before the kernel
         * sees it requested. */
        __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
        r->head++;
        io[d.iface].placed++;
        res->copied++;
        res->done = j + 1;
    }
    return PKB_TX_DONE;
}

int pkb_tx_copy(pkb_txarea *a, uint64_t first, uint32_t n, pkb_txring **rings, uint32_t nrings,
                struct pkb_tx_io *io, struct pkb_tx_result *res)
{
    memset(res, 0, sizeof(*res));
    sigjmp_buf jb;
    int status;
    pkb_bus_install();
    if (sigsetjmp(jb, 0)) {
        status = PKB_TX_FAULT;
    } else {
        pkb_bus_guard = &jb;
        status = copy(a, first, n, rings, nrings, io, res);
    }
    pkb_bus_guard = NULL;
    for (uint32_t i = 0; i < nrings; i++)
        if (rings[i] && io[i].placed)
            pkb_txring_flush(rings[i], &io[i]);
    return status;
}

uint32_t pkb_tx_put(const uint8_t *slab, uint32_t count, uint8_t *base,
                    const struct pktipc_tx_header *h, uint64_t first, uint16_t iface,
                    uint32_t *skipped, uint64_t *bytes)
{
    const struct pktipc_pkt *d = pktipc_slab_pkts(slab);
    uint32_t placed = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (d[i].caplen > h->frame_size) {
            (*skipped)++;
            continue;
        }
        uint32_t slot = (uint32_t)((first + placed) & (h->frame_count - 1));
        memcpy(pktipc_tx_frame(base, h, slot), slab + d[i].data_off, d[i].caplen);
        struct pktipc_tx_desc *t = pktipc_tx_desc(base, h, slot);
        t->len = d[i].caplen;
        t->iface = iface;
        t->flags = 0;
        *bytes += d[i].caplen;
        placed++;
    }
    return placed;
}
