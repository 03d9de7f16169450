/* Broker-side AF_XDP capture (xdp.h): the life cycle first (open, bind,
 * close), then the hot path (fill, recycle), then the counters.
 *
 * Who owns a frame of the UMEM at any time: the broker's free stack; a fill
 * ring (the kernel's, until it writes a frame there and hands it back through
 * the RX ring); or the slab whose descriptor names it, until that slab is free
 * again (pkb_xdp_recycle), whoever holds the batch. A frame is in one of
 * these places only, so the kernel never writes a frame a client may read.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/if_link.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <xdp/xsk.h>

#include "pktipc_shm.h"
#include "cbpf.h"
#include "fill.h"        /* with ingest.h and flowhash.h */
#include "xdp.h"
#include "xdp_meta.h"
#include "xdp_prog.h"    /* pkb_xdp_prog[]: xdp.bpf.c, built with pktipc */

#define LINKTYPE_ETHERNET 1
#define MAX_QUEUES 1024
#define VLAN_ROOM 8             /* two tags beyond the MTU and the Ethernet header */
#define PREFIX_ROOM (int)sizeof(struct pkb_xdp_prefix)
#define RX_BATCH 256            /* RX descriptors read at once */

struct queue {
    struct xsk_socket *xsk;
    struct xsk_ring_cons rx;
    struct xsk_ring_prod fill;
    struct xsk_ring_cons comp;  /* required by the kernel, never used: no TX */
    uint32_t id;
    struct xdp_statistics seen; /* as of the previous pkb_xdp_stats */
};

struct pkb_xdp {
    char ifname[IFNAMSIZ];
    uint32_t ifindex;
    uint8_t mac[6];
    uint8_t mode, want_zc, zc;
    uint32_t snaplen;
    uint32_t frame_size, frame_count, ring_size;
    uint32_t fill_target;       /* frames kept in each fill ring, at most */
    pkb_cbpf *filter;           /* NULL: every frame */
    struct bpf_object *obj;
    int prog_fd, map_fd, link_fd;
    int promisc_fd;             /* a packet socket holding a promiscuous membership */
    struct xsk_umem *umem;
    uint8_t *frames;
    uint8_t *slabs;
    uint32_t slab_size, slab_count;
    uint32_t *held;             /* per slab: frames its descriptors name */
    uint64_t *free;             /* stack of free frames (their addresses) */
    uint32_t nfree;
    uint32_t nq;
    struct queue *q;
    uint32_t first;             /* the queue read first, in turn, so none starves */
    uint64_t received, filtered;
    uint64_t counted;           /* received - filtered, as of the previous pkb_xdp_stats */
};

/* libbpf's last complaint, for a refusal that has no better words. */
static __thread char bpf_said[256];

static int keep_libbpf_message(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    if (level != LIBBPF_DEBUG) {
        vsnprintf(bpf_said, sizeof(bpf_said), fmt, ap);
        bpf_said[strcspn(bpf_said, "\n")] = 0;
    }
    return 0;
}

static pkb_xdp *fail(pkb_xdp *x, int *err, int code, char *errbuf, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Closes what was opened; errbuf gets the reason. */
static pkb_xdp *fail(pkb_xdp *x, int *err, int code, char *errbuf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, PKB_ERRBUF_SIZE, fmt, ap);
    va_end(ap);
    *err = code;
    pkb_xdp_close(x);
    return NULL;
}

static int ifreq_ioctl(int sock, const char *ifname, unsigned long req, struct ifreq *ifr)
{
    memset(ifr, 0, sizeof(*ifr));
    snprintf(ifr->ifr_name, sizeof(ifr->ifr_name), "%s", ifname);
    return ioctl(sock, req, ifr);
}

/* Receive queues of the interface, as its driver counts them; 1 if it
 * cannot say. */
static uint32_t rx_queues(int sock, const char *ifname)
{
    struct ethtool_channels ch = {.cmd = ETHTOOL_GCHANNELS};
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
    ifr.ifr_data = (void *)&ch;
    if (ioctl(sock, SIOCETHTOOL, &ifr) < 0 || ch.rx_count + ch.combined_count == 0)
        return 1;
    return ch.rx_count + ch.combined_count;
}

/* Checks the interface: up, Ethernet, its MTU within a frame; counts its
 * receive queues. */
static pkb_xdp *check_interface(pkb_xdp *x, const struct pkb_xdp_opts *o, int *err,
                                char *errbuf, uint32_t *queues)
{
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr, hw, mtu;
    if (sock < 0)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "socket: %s", strerror(errno));
    if (ifreq_ioctl(sock, o->ifname, SIOCGIFFLAGS, &ifr) < 0 ||
        ifreq_ioctl(sock, o->ifname, SIOCGIFHWADDR, &hw) < 0 ||
        ifreq_ioctl(sock, o->ifname, SIOCGIFMTU, &mtu) < 0) {
        int e = errno;
        close(sock);
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: %s", o->ifname, strerror(e));
    }
    *queues = rx_queues(sock, o->ifname);
    close(sock);
    if (!(ifr.ifr_flags & IFF_UP))
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: the interface is down", o->ifname);
    if (hw.ifr_hwaddr.sa_family != ARPHRD_ETHER)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: link type ARPHRD %u: --xdp captures "
                    "Ethernet interfaces only", o->ifname, hw.ifr_hwaddr.sa_family);
    memcpy(x->mac, hw.ifr_hwaddr.sa_data, 6);
    /* The kernel writes a frame (with its prefix) after XDP_PACKET_HEADROOM
     * bytes of its chunk, and drops one that does not fit the rest. */
    uint32_t need = (uint32_t)mtu.ifr_mtu + ETH_HLEN + VLAN_ROOM + PREFIX_ROOM +
                    XDP_PACKET_HEADROOM;
    x->frame_size = o->frame_size ? o->frame_size : need <= 2048 ? 2048 : 4096;
    if (need > x->frame_size)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: its MTU of %d bytes does not fit "
                    "AF_XDP frames of %u bytes (an MTU of at most %u does)", o->ifname,
                    mtu.ifr_mtu, x->frame_size,
                    x->frame_size - XDP_PACKET_HEADROOM - ETH_HLEN - VLAN_ROOM - PREFIX_ROOM);
    return x;
}

static pkb_xdp *pick_queues(pkb_xdp *x, const struct pkb_xdp_opts *o, uint32_t have, int *err,
                            char *errbuf)
{
    x->nq = o->queues ? o->queue_count : have;
    if (x->nq == 0 || x->nq > MAX_QUEUES || have > MAX_QUEUES)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: %u queues: --xdp serves 1 to %u",
                    o->ifname, x->nq, MAX_QUEUES);
    x->q = calloc(x->nq, sizeof(*x->q));
    if (!x->q)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "out of memory");
    for (uint32_t i = 0; i < x->nq; i++) {
        x->q[i].id = o->queues ? o->queues[i] : i;
        if (x->q[i].id >= have)
            return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s has %u receive queue%s (0 to %u): "
                        "there is no queue %u", o->ifname, have, have > 1 ? "s" : "",
                        have - 1, x->q[i].id);
        for (uint32_t j = 0; j < i; j++)
            if (x->q[j].id == x->q[i].id)
                return fail(x, err, PKB_XDP_EFAIL, errbuf, "queue %u is given twice",
                            x->q[i].id);
    }
    return x;
}

static pkb_xdp *load_program(pkb_xdp *x, uint32_t have, int *err, char *errbuf)
{
    LIBBPF_OPTS(bpf_object_open_opts, oo, .object_name = "pktipc_xdp");
    libbpf_set_print(keep_libbpf_message);
    bpf_said[0] = 0;
    x->obj = bpf_object__open_mem(pkb_xdp_prog, sizeof(pkb_xdp_prog), &oo);
    if (!x->obj)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "the XDP program: %s", strerror(errno));
    struct bpf_map *map = bpf_object__find_map_by_name(x->obj, "pktipc_xsks");
    struct bpf_program *prog = bpf_object__find_program_by_name(x->obj, "pktipc_xdp");
    if (!map || !prog || bpf_map__set_max_entries(map, have) < 0)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "the XDP program is not pktipc's");
    int rc = bpf_object__load(x->obj);
    if (rc == -EPERM || rc == -EACCES)
        return fail(x, err, PKB_XDP_EPERM, errbuf, "--xdp on %s needs CAP_BPF and "
                    "CAP_NET_ADMIN (and CAP_NET_RAW): run as root, or give them to the broker",
                    x->ifname);
    if (rc < 0)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "this kernel refuses pktipc's XDP program "
                    "(%s)%s%s: it needs XDP and AF_XDP sockets (CONFIG_XDP_SOCKETS), "
                    "Linux 6.1 or later", strerror(-rc), bpf_said[0] ? ": " : "", bpf_said);
    x->prog_fd = bpf_program__fd(prog);
    x->map_fd = bpf_map__fd(map);
    return x;
}

static pkb_xdp *attach(pkb_xdp *x, int *err, char *errbuf)
{
    LIBBPF_OPTS(bpf_link_create_opts, lo,
                .flags = x->mode == PKB_XDP_SKB ? XDP_FLAGS_SKB_MODE : XDP_FLAGS_DRV_MODE);
    /* A link, not a netlink attachment: the kernel detaches the program
     * when the broker is gone, however it ends. */
    x->link_fd = bpf_link_create(x->prog_fd, (int)x->ifindex, BPF_XDP, &lo);
    if (x->link_fd >= 0)
        return x;
    int e = errno;
    const char *mode = x->mode == PKB_XDP_SKB ? "skb" : "native";
    uint32_t id = 0;
    if (e == EPERM || e == EACCES)
        return fail(x, err, PKB_XDP_EPERM, errbuf, "--xdp on %s needs CAP_NET_ADMIN and "
                    "CAP_BPF: run as root, or give them to the broker", x->ifname);
    if ((e == EBUSY || e == EEXIST) && bpf_xdp_query_id((int)x->ifindex, 0, &id) == 0 && id)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s already has an XDP program (id %u): "
                    "--xdp needs the interface's XDP hook for itself", x->ifname, id);
    if (e == EOPNOTSUPP)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: its driver has no %s XDP%s",
                    x->ifname, mode, x->mode == PKB_XDP_NATIVE ? " (--xdp-mode skb works "
                    "with any driver)" : "");
    if (e == ERANGE)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: the driver refuses %s XDP at this MTU "
                    "(on veth, the peer's MTU must be at most 3506 for native XDP)",
                    x->ifname, mode);
    return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: attaching the XDP program (%s mode): %s",
                x->ifname, mode, strerror(e));
}

/* A membership, not IFF_PROMISC: the kernel drops it with the socket. The
 * socket (protocol 0) receives nothing. */
static pkb_xdp *promiscuous(pkb_xdp *x, int *err, char *errbuf)
{
    struct packet_mreq mr = {.mr_ifindex = (int)x->ifindex, .mr_type = PACKET_MR_PROMISC};
    x->promisc_fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (x->promisc_fd < 0 && (errno == EPERM || errno == EACCES))
        return fail(x, err, PKB_XDP_EPERM, errbuf, "capturing on %s needs CAP_NET_RAW: run as "
                    "root, or give the capability to the broker", x->ifname);
    if (x->promisc_fd < 0 ||
        setsockopt(x->promisc_fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof(mr)) < 0)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: promiscuous mode: %s", x->ifname,
                    strerror(errno));
    return x;
}

pkb_xdp *pkb_xdp_open(const struct pkb_xdp_opts *o, int *err, char *errbuf)
{
    pkb_xdp *x = calloc(1, sizeof(*x));
    if (!x)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "out of memory");
    x->prog_fd = x->map_fd = x->link_fd = x->promisc_fd = -1;
    x->snaplen = o->snaplen;
    x->mode = o->mode;
    x->want_zc = o->zero_copy;
    x->frame_count = o->frame_count;
    x->ring_size = o->ring_size;
    if (x->ring_size < 64 || x->ring_size & (x->ring_size - 1))
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "ring size %u: a power of two from 64",
                    x->ring_size);
    if (strlen(o->ifname) >= IFNAMSIZ || !(x->ifindex = if_nametoindex(o->ifname)))
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: no such interface", o->ifname);
    snprintf(x->ifname, sizeof(x->ifname), "%s", o->ifname);
    uint32_t have = 1;
    if (!check_interface(x, o, err, errbuf, &have) || !pick_queues(x, o, have, err, errbuf))
        return NULL;
    /* Each fill ring holds at most its share of half the frames: the other
     * half are for the slabs clients hold, and a queue with no traffic
     * keeps no more than that idle. */
    x->fill_target = x->frame_count / 2 / x->nq;
    if (x->fill_target > x->ring_size)
        x->fill_target = x->ring_size;
    if (x->fill_target < 64)
        return fail(x, err, PKB_XDP_EFAIL, errbuf, "%u frames for %u queue%s: at least %u are "
                    "needed", x->frame_count, x->nq, x->nq > 1 ? "s" : "", 128 * x->nq);
    /* The filter runs in the broker, before a frame is described: tags are
     * matched in the bytes, where AF_XDP leaves them. */
    if (o->filter[0] && !(x->filter = pkb_cbpf_compile(o->filter, x->snaplen, errbuf))) {
        *err = PKB_XDP_EFAIL;
        pkb_xdp_close(x);
        return NULL;
    }
    if (o->promisc && !promiscuous(x, err, errbuf))
        return NULL;
    if (!load_program(x, have, err, errbuf) || !attach(x, err, errbuf))
        return NULL;
    return x;
}

uint32_t pkb_xdp_ifindex(const pkb_xdp *x) { return x->ifindex; }
uint32_t pkb_xdp_frame_size(const pkb_xdp *x) { return x->frame_size; }
uint32_t pkb_xdp_queue_count(const pkb_xdp *x) { return x->nq; }
uint32_t pkb_xdp_queue(const pkb_xdp *x, uint32_t i) { return x->q[i].id; }
int pkb_xdp_fd(const pkb_xdp *x, uint32_t i) { return xsk_socket__fd(x->q[i].xsk); }
uint8_t pkb_xdp_zero_copy(const pkb_xdp *x) { return x->zc; }

static void top_up(pkb_xdp *x);

static int bind_fail(pkb_xdp *x, int *err, int code, char *errbuf, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int bind_fail(pkb_xdp *x, int *err, int code, char *errbuf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, PKB_ERRBUF_SIZE, fmt, ap);
    va_end(ap);
    (void)x;
    *err = code;
    return -1;
}

int pkb_xdp_bind(pkb_xdp *x, uint8_t *frames, uint8_t *slabs, uint32_t slab_size,
                 uint32_t slab_count, int *err, char *errbuf)
{
    x->frames = frames;
    x->slabs = slabs;
    x->slab_size = slab_size;
    x->slab_count = slab_count;
    x->held = calloc(slab_count, sizeof(*x->held));
    x->free = calloc(x->frame_count, sizeof(*x->free));
    if (!x->held || !x->free)
        return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "out of memory");
    for (uint32_t i = 0; i < x->frame_count; i++)
        x->free[i] = (uint64_t)(x->frame_count - 1 - i) * x->frame_size;
    x->nfree = x->frame_count;

    struct xsk_umem_config uc = {.fill_size = x->ring_size, .comp_size = 64,
                                 .frame_size = x->frame_size, .frame_headroom = 0, .flags = 0};
    uint64_t size = (uint64_t)x->frame_size * x->frame_count;
    int rc = xsk_umem__create(&x->umem, frames, size, &x->q[0].fill, &x->q[0].comp, &uc);
    if (rc == -EPERM || rc == -EACCES)
        return bind_fail(x, err, PKB_XDP_EPERM, errbuf, "AF_XDP sockets need CAP_NET_RAW: "
                         "run as root, or give it to the broker");
    if (rc == -ENOBUFS || rc == -ENOMEM)
        return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: the kernel pins the %llu MiB of "
                         "AF_XDP frames, beyond the limit on locked memory (raise "
                         "RLIMIT_MEMLOCK, give the broker CAP_IPC_LOCK, or use fewer --frames)",
                         x->ifname, (unsigned long long)(size >> 20));
    if (rc == -EAFNOSUPPORT)
        return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "this kernel has no AF_XDP sockets "
                         "(CONFIG_XDP_SOCKETS)");
    if (rc < 0)
        return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: registering the AF_XDP frames: %s",
                         x->ifname, strerror(-rc));
    struct xsk_socket_config sc = {
        .rx_size = x->ring_size, .tx_size = 0,
        .libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
        .bind_flags = x->want_zc ? XDP_ZEROCOPY : 0,
    };
    for (uint32_t i = 0; i < x->nq; i++) {
        struct queue *q = &x->q[i];
        /* The first socket takes the UMEM's own fill and completion rings;
         * the others, rings of their own on the shared UMEM. */
        rc = xsk_socket__create_shared(&q->xsk, x->ifname, q->id, x->umem, &q->rx, NULL,
                                       &q->fill, &q->comp, &sc);
        if (rc == -EPERM || rc == -EACCES)
            return bind_fail(x, err, PKB_XDP_EPERM, errbuf, "AF_XDP sockets need CAP_NET_RAW: "
                             "run as root, or give it to the broker");
        if (rc < 0 && x->want_zc && (rc == -EOPNOTSUPP || rc == -EPROTONOSUPPORT))
            return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "%s: its driver cannot do "
                             "zero-copy AF_XDP (leave --zero-copy out: copy mode works)",
                             x->ifname);
        if (rc == -EBUSY)
            return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "%s queue %u: another AF_XDP "
                             "socket is bound to it", x->ifname, q->id);
        if (rc < 0)
            return bind_fail(x, err, PKB_XDP_EFAIL, errbuf, "%s queue %u: AF_XDP socket: %s",
                             x->ifname, q->id, strerror(-rc));
        if ((rc = xsk_socket__update_xskmap(q->xsk, x->map_fd)) < 0)
            return bind_fail(x, err, rc == -EPERM ? PKB_XDP_EPERM : PKB_XDP_EFAIL, errbuf,
                             "%s queue %u: the XDP program's socket map: %s", x->ifname, q->id,
                             strerror(-rc));
    }
    struct xdp_options opts = {0};
    socklen_t len = sizeof(opts);
    if (getsockopt(xsk_socket__fd(x->q[0].xsk), SOL_XDP, XDP_OPTIONS, &opts, &len) == 0)
        x->zc = (opts.flags & XDP_OPTIONS_ZEROCOPY) != 0;
    top_up(x);
    return 0;
}

void pkb_xdp_close(pkb_xdp *x)
{
    if (!x)
        return;
    if (x->link_fd >= 0)
        close(x->link_fd);      /* the program is detached: no more redirects */
    for (uint32_t i = 0; x->q && i < x->nq; i++)
        if (x->q[i].xsk)
            xsk_socket__delete(x->q[i].xsk);
    if (x->umem)
        xsk_umem__delete(x->umem);
    if (x->obj)
        bpf_object__close(x->obj);
    if (x->promisc_fd >= 0)
        close(x->promisc_fd);
    pkb_cbpf_free(x->filter);
    free(x->q);
    free(x->held);
    free(x->free);
    free(x);
}

/* --- the hot path ---------------------------------------------------------------- */

/* Gives free frames to the fill rings, each up to its target. */
static void top_up(pkb_xdp *x)
{
    for (uint32_t i = 0; i < x->nq && x->nfree; i++) {
        struct queue *q = &x->q[i];
        uint32_t in_ring = x->ring_size - xsk_prod_nb_free(&q->fill, x->ring_size);
        if (in_ring >= x->fill_target)
            continue;
        uint32_t n = x->fill_target - in_ring, idx;
        if (n > x->nfree)
            n = x->nfree;
        if (xsk_ring_prod__reserve(&q->fill, n, &idx) != n)
            continue;
        for (uint32_t k = 0; k < n; k++)
            *xsk_ring_prod__fill_addr(&q->fill, idx + k) = x->free[--x->nfree];
        xsk_ring_prod__submit(&q->fill, n);
    }
}

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* The direction of a received frame, from its destination, as the kernel's
 * eth_type_trans() decides it. */
static inline uint16_t direction(const pkb_xdp *x, const uint8_t *dst)
{
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    unsigned dir = !(dst[0] & 1) ? (memcmp(dst, x->mac, 6) ? PKTIPC_DIR_OTHERHOST
                                                            : PKTIPC_DIR_HOST)
                   : memcmp(dst, bcast, 6) ? PKTIPC_DIR_MULTICAST : PKTIPC_DIR_BROADCAST;
    return (uint16_t)(dir << PKTIPC_F_DIR_SHIFT);
}

/* TAI - UTC, in whole seconds (the kernel keeps it as such), as ns. */
static int64_t tai_offset_ns(void)
{
    struct timespec tai, real;
    clock_gettime(CLOCK_TAI, &tai);
    clock_gettime(CLOCK_REALTIME, &real);
    int64_t d = (int64_t)(tai.tv_sec - real.tv_sec) * 1000000000 + (tai.tv_nsec - real.tv_nsec);
    return (d + (d < 0 ? -500000000 : 500000000)) / 1000000000 * 1000000000;
}

/* One frame the kernel placed, after the XDP program's prefix, described in
 * f's slab (which has room); 0 if the filter refused it. */
static inline int describe(pkb_xdp *x, struct pkb_fill *f, const struct xdp_desc *d,
                           int64_t tai_off)
{
    const struct pkb_xdp_prefix *pre = (const void *)(x->frames + d->addr);
    if (d->len < sizeof(*pre))
        return 0;
    uint8_t *frame = x->frames + d->addr + sizeof(*pre);
    uint32_t len = d->len - (uint32_t)sizeof(*pre);
    if (x->filter && !pkb_cbpf_match(x->filter, frame, len))
        return 0;
    uint16_t flags = 0, tci = 0;
    if (len >= ETH_HLEN) {
        flags = direction(x, frame);
        uint16_t tpid = be16(frame + 12);
        if (len >= ETH_HLEN + 4 && (tpid == ETH_P_8021Q || tpid == ETH_P_8021AD ||
                                    tpid == 0x9100)) {
            /* The tag is in the bytes, as on the wire. */
            tci = be16(frame + 14);
            flags |= PKTIPC_F_VLAN_VALID | PKTIPC_F_VLAN_REINSERTED;
            if (tpid != ETH_P_8021Q)
                flags |= PKTIPC_F_QINQ;
        }
    }
    uint32_t caplen = len < x->snaplen ? len : x->snaplen;
    if (caplen < len)
        flags |= PKTIPC_F_TRUNCATED;
    pkb_fill_desc(f, frame, (uint32_t)(frame - f->slab), (int64_t)pre->tai_ns - tai_off,
                  caplen, len, LINKTYPE_ETHERNET, tci, flags);
    return 1;
}

int pkb_xdp_fill(pkb_xdp *x, struct pkb_fill *f, uint32_t max_pkts)
{
    uint32_t cap = f->data_low / sizeof(struct pktipc_pkt);
    if (cap > max_pkts)
        cap = max_pkts;
    int64_t tai_off = tai_offset_ns();
    uint32_t empty = 0;         /* queues found empty in a row */
    x->first = (x->first + 1) % x->nq;
    for (uint32_t i = x->first; f->count < cap && empty < x->nq; i = (i + 1) % x->nq) {
        struct queue *q = &x->q[i];
        uint32_t want = cap - f->count, idx;
        if (want > RX_BATCH)
            want = RX_BATCH;
        uint32_t n = xsk_ring_cons__peek(&q->rx, want, &idx);
        empty = n ? 0 : empty + 1;
        for (uint32_t k = 0; k < n; k++) {
            const struct xdp_desc *d = xsk_ring_cons__rx_desc(&q->rx, idx + k);
            if (!describe(x, f, d, tai_off)) {
                x->free[x->nfree++] = d->addr & ~(uint64_t)(x->frame_size - 1);
                x->filtered++;
            }
        }
        x->received += n;
        xsk_ring_cons__release(&q->rx, n);
    }
    if (f->count) {
        uint32_t slab = (uint32_t)((f->slab - x->slabs) / x->slab_size);
        x->held[slab] = f->count;
    }
    top_up(x);      /* what the filter refused */
    return f->count >= cap ? PKB_FILL_FULL : PKB_FILL_EMPTY;
}

void pkb_xdp_recycle(pkb_xdp *x, uint32_t slab)
{
    if (slab >= x->slab_count || !x->held[slab])
        return;
    const uint8_t *base = x->slabs + (size_t)slab * x->slab_size;
    const struct pktipc_pkt *p = pktipc_slab_pkts(base);
    for (uint32_t i = 0; i < x->held[slab]; i++) {
        uint64_t addr = (uint64_t)(base + p[i].data_off - x->frames);
        x->free[x->nfree++] = addr & ~(uint64_t)(x->frame_size - 1);
    }
    x->held[slab] = 0;
    top_up(x);
}

int pkb_xdp_short(pkb_xdp *x)
{
    if (x->nfree)
        return 0;
    uint64_t in_rings = 0;
    for (uint32_t i = 0; i < x->nq; i++)
        in_rings += x->ring_size - xsk_prod_nb_free(&x->q[i].fill, x->ring_size);
    return in_rings < (uint64_t)x->nq * x->fill_target / 2;
}

/* --- counters -------------------------------------------------------------------- */

int pkb_xdp_stats(pkb_xdp *x, struct pktipc_iface *e)
{
    uint64_t drops = 0, empty = 0;
    for (uint32_t i = 0; i < x->nq; i++) {
        struct queue *q = &x->q[i];
        struct xdp_statistics st = {0};
        socklen_t len = sizeof(st);
        if (getsockopt(xsk_socket__fd(q->xsk), SOL_XDP, XDP_STATISTICS, &st, &len) < 0)
            return -1;
        /* The kernel's counts only grow: what they grew by since the last
         * read. A frame refused for want of a free frame is counted in
         * rx_dropped (and, as a failed allocation, in the fill ring's). */
        drops += st.rx_dropped - q->seen.rx_dropped + st.rx_ring_full - q->seen.rx_ring_full;
        empty += st.rx_fill_ring_empty_descs - q->seen.rx_fill_ring_empty_descs;
        q->seen = st;
    }
    uint64_t passed = x->received - x->filtered;
    e->kernel_packets += passed - x->counted + drops;
    e->kernel_drops += drops;
    e->kernel_freezes += empty;
    x->counted = passed;
    return 0;
}

void pkb_xdp_counts(pkb_xdp *x, struct pkb_xdp_counts *c)
{
    memset(c, 0, sizeof(*c));
    c->received = x->received;
    c->filtered = x->filtered;
    for (uint32_t i = 0; i < x->nq; i++) {
        c->rx_dropped += x->q[i].seen.rx_dropped;
        c->rx_ring_full += x->q[i].seen.rx_ring_full;
        c->rx_fill_ring_empty_descs += x->q[i].seen.rx_fill_ring_empty_descs;
    }
    c->free_frames = x->nfree;
    for (uint32_t s = 0; s < x->slab_count; s++)
        c->held_frames += x->held[s];
}
