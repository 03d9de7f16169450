/* Broker-side live capture: TPACKET_V3 blocks into slabs, one call per batch. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <linux/if_ether.h>
#include <linux/filter.h>
#include <linux/if_packet.h>
#include <linux/net_tstamp.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <pcap/pcap.h>

#include "pktipc_shm.h"
#include "fill.h"        /* with ingest.h and flowhash.h */
#include "afpacket.h"

#define LINKTYPE_ETHERNET 1
#define LINKTYPE_RAW 101
#define VLAN_TAG_LEN 4
#define VLAN_OFFSET 12          /* the tag goes after both MAC addresses */

struct pkb_ring {
    int fd;
    uint32_t ifindex;
    uint32_t linktype;
    uint32_t snaplen;
    int32_t fanout_id;
    int vlan_reinsert;
    uint8_t *map;
    size_t map_size;
    uint32_t block_size;
    uint32_t block_count;
    uint32_t block;             /* the block to read next */
    uint32_t pkt_index;         /* packets of that block already copied */
    uint32_t pkt_off;           /* offset of the next one in the block */
    char ifname[IFNAMSIZ];
    int hw_saved;               /* hw_before is the interface's, to be put back */
    struct hwtstamp_config hw_before;
};

static pkb_ring *fail(pkb_ring *r, int *err, int code, char *errbuf, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Closes what was opened; errbuf gets the reason (or keeps it, fmt NULL). */
static pkb_ring *fail(pkb_ring *r, int *err, int code, char *errbuf, const char *fmt, ...)
{
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, PKB_ERRBUF_SIZE, fmt, ap);
        va_end(ap);
    }
    *err = code;
    pkb_ring_close(r);
    return NULL;
}

/* Compiles the filter as tcpdump would on this interface. A live libpcap
 * handle (activated with a 64 KiB ring, not promiscuous, closed at once,
 * never read) is what makes "vlan" match the tag the kernel stripped,
 * through the BPF extensions libpcap uses on Linux; a dead handle would look
 * for the tag in the bytes, where the kernel no longer leaves it. */
static int compile_filter(const struct pkb_ring_opts *o, struct bpf_program *prog, char *errbuf)
{
    char pcap_err[PCAP_ERRBUF_SIZE] = "";
    pcap_t *p = pcap_create(o->ifname, pcap_err);
    if (!p) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "%s", pcap_err);
        return -1;
    }
    pcap_set_snaplen(p, (int)o->snaplen);
    pcap_set_immediate_mode(p, 1);
    pcap_set_buffer_size(p, 1 << 16);
    int rc = pcap_activate(p);
    if (rc < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "%s: %s", o->ifname,
                 rc == PCAP_ERROR ? pcap_geterr(p) : pcap_statustostr(rc));
        pcap_close(p);
        return -1;
    }
    if (pcap_compile(p, prog, o->filter, 1, PCAP_NETMASK_UNKNOWN) < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "bad filter '%s': %s", o->filter, pcap_geterr(p));
        pcap_close(p);
        return -1;
    }
    pcap_close(p);
    return 0;
}

/* Sets an interface's timestamping configuration; 0 or -1 (errno). Safe in
 * a forked child (no stdio). */
static int set_hwtstamp(int fd, const char *ifname, struct hwtstamp_config *cfg)
{
    struct ifreq ifr = {0};
    memcpy(ifr.ifr_name, ifname, strnlen(ifname, sizeof(ifr.ifr_name) - 1));
    ifr.ifr_data = (void *)cfg;
    return ioctl(fd, SIOCSHWTSTAMP, &ifr);
}

/* Timestamps from the NIC's clock for every packet. The interface's
 * configuration before is kept, to be put back when the ring closes (a PTP
 * daemon may rely on it); an interface that cannot tell it had none. */
static int hw_timestamps(pkb_ring *r, const char *ifname, char *errbuf)
{
    int fd = r->fd;
    struct hwtstamp_config cfg = {.tx_type = HWTSTAMP_TX_OFF, .rx_filter = HWTSTAMP_FILTER_ALL};
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
    ifr.ifr_data = (void *)&r->hw_before;
    if (ioctl(fd, SIOCGHWTSTAMP, &ifr) < 0)
        r->hw_before = (struct hwtstamp_config){.tx_type = HWTSTAMP_TX_OFF,
                                                .rx_filter = HWTSTAMP_FILTER_NONE};
    snprintf(r->ifname, sizeof(r->ifname), "%s", ifname);
    if (set_hwtstamp(fd, ifname, &cfg) < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE,
                 "%s does not support hardware timestamps (SIOCSHWTSTAMP: %s)", ifname,
                 strerror(errno));
        return -1;
    }
    r->hw_saved = 1;
    int req = SOF_TIMESTAMPING_RAW_HARDWARE;
    if (setsockopt(fd, SOL_PACKET, PACKET_TIMESTAMP, &req, sizeof(req)) < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "%s: PACKET_TIMESTAMP: %s", ifname, strerror(errno));
        return -1;
    }
    return 0;
}

pkb_ring *pkb_ring_open(const struct pkb_ring_opts *o, int *err, char *errbuf)
{
    pkb_ring *r = calloc(1, sizeof(*r));
    if (!r)
        return fail(r, err, PKB_RING_ESYS, errbuf, "out of memory");
    r->fd = -1;
    r->map = MAP_FAILED;
    r->snaplen = o->snaplen;
    r->vlan_reinsert = o->vlan_reinsert;
    r->fanout_id = PKB_FANOUT_NONE;
    r->block_size = o->block_size;
    r->block_count = o->block_count;

    if (strlen(o->ifname) >= IFNAMSIZ || !(r->ifindex = if_nametoindex(o->ifname)))
        return fail(r, err, PKB_RING_ENODEV, errbuf, "%s: no such interface", o->ifname);
    /* Protocol 0: nothing is queued before the filter is on and the socket bound. */
    r->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (r->fd < 0) {
        if (errno == EPERM || errno == EACCES)
            return fail(r, err, PKB_RING_EPERM, errbuf,
                        "capturing on %s needs CAP_NET_RAW: run as root, or give the "
                        "capability to the broker", o->ifname);
        return fail(r, err, PKB_RING_ESYS, errbuf, "socket(AF_PACKET): %s", strerror(errno));
    }
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", o->ifname);
    if (ioctl(r->fd, SIOCGIFFLAGS, &ifr) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: SIOCGIFFLAGS: %s", o->ifname,
                    strerror(errno));
    if (!(ifr.ifr_flags & IFF_UP))
        return fail(r, err, PKB_RING_EDOWN, errbuf, "%s: the interface is down", o->ifname);
    if (ioctl(r->fd, SIOCGIFHWADDR, &ifr) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: SIOCGIFHWADDR: %s", o->ifname,
                    strerror(errno));
    switch (ifr.ifr_hwaddr.sa_family) {
    case ARPHRD_ETHER:
    case ARPHRD_LOOPBACK:
        r->linktype = LINKTYPE_ETHERNET;
        break;
    case ARPHRD_NONE:
        r->linktype = LINKTYPE_RAW;
        break;
    default:
        return fail(r, err, PKB_RING_EUNSUPP, errbuf,
                    "%s: link type ARPHRD %u is not supported (Ethernet and raw IP are)",
                    o->ifname, ifr.ifr_hwaddr.sa_family);
    }

    struct bpf_program prog;
    if (compile_filter(o, &prog, errbuf) < 0)
        return fail(r, err, PKB_RING_EFILTER, errbuf, NULL);
    /* libpcap's struct bpf_insn is the kernel's struct sock_filter. */
    struct sock_fprog fprog = {.len = (unsigned short)prog.bf_len,
                               .filter = (struct sock_filter *)prog.bf_insns};
    int rc = setsockopt(r->fd, SOL_SOCKET, SO_ATTACH_FILTER, &fprog, sizeof(fprog));
    pcap_freecode(&prog);
    int one = 1;
    if (rc < 0 || setsockopt(r->fd, SOL_SOCKET, SO_LOCK_FILTER, &one, sizeof(one)) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: attaching the filter: %s",
                    o->ifname, strerror(errno));

    int version = TPACKET_V3;
    if (setsockopt(r->fd, SOL_PACKET, PACKET_VERSION, &version, sizeof(version)) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf, "PACKET_VERSION: %s", strerror(errno));
    if (o->hw_timestamps && hw_timestamps(r, o->ifname, errbuf) < 0)
        return fail(r, err, PKB_RING_EUNSUPP, errbuf, NULL);
    struct tpacket_req3 req = {
        .tp_block_size = o->block_size,
        .tp_block_nr = o->block_count,
        .tp_frame_size = TPACKET_ALIGNMENT << 7,
        .tp_frame_nr = (uint32_t)((uint64_t)o->block_size * o->block_count / (TPACKET_ALIGNMENT << 7)),
        .tp_retire_blk_tov = o->block_timeout_ms,
    };
    if (setsockopt(r->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) < 0)
        return fail(r, err, PKB_RING_ESYS, errbuf,
                    "%s: a ring of %u blocks of %u bytes: %s", o->ifname, o->block_count,
                    o->block_size, strerror(errno));
    r->map_size = (size_t)o->block_size * o->block_count;
    r->map = mmap(NULL, r->map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_LOCKED, r->fd, 0);
    if (r->map == MAP_FAILED)   /* MAP_LOCKED may exceed RLIMIT_MEMLOCK: try without */
        r->map = mmap(NULL, r->map_size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (r->map == MAP_FAILED)
        return fail(r, err, PKB_RING_ESYS, errbuf, "%s: mapping the ring: %s", o->ifname,
                    strerror(errno));

    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = (int)r->ifindex};
    if (bind(r->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        return fail(r, err, errno == ENETDOWN ? PKB_RING_EDOWN : PKB_RING_ESYS, errbuf,
                    "%s: bind: %s", o->ifname, strerror(errno));
    if (o->promisc) {
        /* A membership, not IFF_PROMISC: the kernel drops it with the socket. */
        struct packet_mreq mr = {.mr_ifindex = (int)r->ifindex, .mr_type = PACKET_MR_PROMISC};
        if (setsockopt(r->fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof(mr)) < 0)
            return fail(r, err, PKB_RING_ESYS, errbuf, "%s: promiscuous mode: %s",
                        o->ifname, strerror(errno));
    }
    if (o->fanout_id != PKB_FANOUT_NONE) {
        uint32_t flags = o->fanout_mode == PACKET_FANOUT_HASH ? PACKET_FANOUT_FLAG_DEFRAG : 0;
        uint32_t arg;
        if (o->fanout_id == PKB_FANOUT_AUTO)
            arg = (o->fanout_mode | flags | PACKET_FANOUT_FLAG_UNIQUEID) << 16;
        else
            arg = (uint32_t)o->fanout_id | (o->fanout_mode | flags) << 16;
        if (setsockopt(r->fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg)) < 0)
            return fail(r, err, PKB_RING_ESYS, errbuf,
                        "%s: joining fanout group %d: %s%s", o->ifname, o->fanout_id,
                        strerror(errno), errno == EINVAL ?
                        " (a group of that id exists with another mode or interface)" : "");
        uint32_t got = 0;
        socklen_t len = sizeof(got);
        if (getsockopt(r->fd, SOL_PACKET, PACKET_FANOUT, &got, &len) < 0)
            return fail(r, err, PKB_RING_ESYS, errbuf, "PACKET_FANOUT: %s", strerror(errno));
        r->fanout_id = (int32_t)(got & 0xffff);
    }
    return r;
}

int pkb_ring_fd(const pkb_ring *r) { return r->fd; }
uint32_t pkb_ring_ifindex(const pkb_ring *r) { return r->ifindex; }
uint32_t pkb_ring_linktype(const pkb_ring *r) { return r->linktype; }
int32_t pkb_ring_fanout_id(const pkb_ring *r) { return r->fanout_id; }

static inline struct tpacket_block_desc *block_at(const pkb_ring *r, uint32_t i)
{
    return (struct tpacket_block_desc *)(r->map + (size_t)i * r->block_size);
}

/* One packet of a block into the slab; 0 when the slab has no room for it. */
static int copy_packet(const pkb_ring *r, struct pkb_fill *f, const struct tpacket3_hdr *h)
{
    const uint8_t *frame = (const uint8_t *)h + h->tp_mac;
    const struct sockaddr_ll *sll =
        (const struct sockaddr_ll *)((const uint8_t *)h + TPACKET_ALIGN(sizeof(*h)));
    uint32_t snap = h->tp_snaplen, wire = h->tp_len;
    uint16_t flags = 0, tci = 0, tpid = 0;
    int insert = 0;

    if ((h->tp_status & TP_STATUS_VLAN_VALID) || h->hv1.tp_vlan_tci) {
        tci = (uint16_t)h->hv1.tp_vlan_tci;
        tpid = (h->tp_status & TP_STATUS_VLAN_TPID_VALID) && h->hv1.tp_vlan_tpid
                   ? (uint16_t)h->hv1.tp_vlan_tpid : ETH_P_8021Q;
        flags |= PKTIPC_F_VLAN_VALID;
        if (tpid != ETH_P_8021Q)
            flags |= PKTIPC_F_QINQ;
        /* As libpcap does: back into the bytes, lengths grown by the tag, the
         * captured length still at most the snap length. */
        insert = r->vlan_reinsert && r->linktype == LINKTYPE_ETHERNET && snap >= VLAN_OFFSET;
    }
    uint32_t caplen = snap + (insert ? VLAN_TAG_LEN : 0);
    if (caplen > r->snaplen)
        caplen = r->snaplen;
    if (insert) {
        wire += VLAN_TAG_LEN;
        flags |= PKTIPC_F_VLAN_REINSERTED;
    }

    uint32_t off = pkb_fill_room(f, caplen);
    if (!off)
        return 0;
    uint8_t *dst = f->slab + off;
    if (insert) {
        uint8_t tag[VLAN_TAG_LEN] = {(uint8_t)(tpid >> 8), (uint8_t)tpid,
                                     (uint8_t)(tci >> 8), (uint8_t)tci};
        memcpy(dst, frame, VLAN_OFFSET);
        memcpy(dst + VLAN_OFFSET, tag, caplen - VLAN_OFFSET < VLAN_TAG_LEN
                                           ? caplen - VLAN_OFFSET : VLAN_TAG_LEN);
        if (caplen > VLAN_OFFSET + VLAN_TAG_LEN)
            memcpy(dst + VLAN_OFFSET + VLAN_TAG_LEN, frame + VLAN_OFFSET,
                   caplen - VLAN_OFFSET - VLAN_TAG_LEN);
    } else {
        memcpy(dst, frame, caplen);
    }
    if (caplen < wire)
        flags |= PKTIPC_F_TRUNCATED;
    if (h->tp_status & TP_STATUS_TS_RAW_HARDWARE)
        flags |= PKTIPC_F_TS_HW;
    if (sll->sll_pkttype <= PACKET_OUTGOING)
        flags |= (uint16_t)((sll->sll_pkttype + 1) << PKTIPC_F_DIR_SHIFT);
    pkb_fill_add(f, off, (int64_t)h->tp_sec * 1000000000 + h->tp_nsec, caplen, wire,
                 (uint16_t)r->linktype, tci, flags);
    return 1;
}

int pkb_ring_fill(pkb_ring *r, struct pkb_fill *f, uint32_t max_pkts)
{
    for (;;) {
        struct tpacket_block_desc *b = block_at(r, r->block);
        /* Make sure the kernel's writes to the block are seen before we read
         * it: the status is the kernel's release store. */
        if (!(__atomic_load_n(&b->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
            return PKB_FILL_EMPTY;
        uint32_t n = b->hdr.bh1.num_pkts;
        if (r->pkt_index == 0)
            r->pkt_off = b->hdr.bh1.offset_to_first_pkt;
        while (r->pkt_index < n) {
            if (f->count >= max_pkts)
                return PKB_FILL_FULL;
            const struct tpacket3_hdr *h = (const struct tpacket3_hdr *)((uint8_t *)b + r->pkt_off);
            if (!copy_packet(r, f, h))
                return f->count ? PKB_FILL_FULL : PKB_FILL_TOOBIG;
            r->pkt_off += h->tp_next_offset;
            r->pkt_index++;
        }
        /* Make sure every byte we copied out of the block is read before the
         * kernel may write into it again. */
        __atomic_store_n(&b->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        r->block = (r->block + 1) % r->block_count;
        r->pkt_index = 0;
    }
}

int pkb_ring_stats(pkb_ring *r, struct pktipc_iface *e)
{
    struct tpacket_stats_v3 st = {0};
    socklen_t len = sizeof(st);
    if (getsockopt(r->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0)
        return -1;
    /* tp_packets already includes the drops: everything the filter let in. */
    e->kernel_packets += st.tp_packets;
    e->kernel_drops += st.tp_drops;
    e->kernel_freezes += st.tp_freeze_q_cnt;
    return 0;
}

int pkb_ring_sock_error(pkb_ring *r)
{
    int e = 0;
    socklen_t len = sizeof(e);
    if (getsockopt(r->fd, SOL_SOCKET, SO_ERROR, &e, &len) < 0)
        return errno;
    return e;
}

/* The interfaces' timestamping configurations are put back when their rings
 * close, and also by a keeper process once the broker is gone however it
 * ends (killed too, or no longer allowed to: --user drops CAP_NET_ADMIN). */
int pkb_ring_keep_timestamping(pkb_ring *const *rings, uint32_t n, char *errbuf)
{
    struct { char name[IFNAMSIZ]; struct hwtstamp_config cfg; } keep[64];
    uint32_t k = 0;
    for (uint32_t i = 0; i < n && k < 64; i++)
        if (rings[i]->hw_saved) {
            memcpy(keep[k].name, rings[i]->ifname, IFNAMSIZ);
            keep[k++].cfg = rings[i]->hw_before;
        }
    if (!k)
        return 0;
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "pipe: %s", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0) {
        /* Only async-signal-safe calls from here: the parent has threads. */
        int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (dup2(p[0], 3) < 0 || dup2(sock, 4) < 0)
            _exit(1);
        close_range(5, ~0U, 0);
        struct sigaction ign = {.sa_handler = SIG_IGN};
        sigaction(SIGINT, &ign, NULL);      /* a Ctrl-C for the broker is not ours */
        sigaction(SIGTERM, &ign, NULL);
        sigaction(SIGHUP, &ign, NULL);
        char c;
        while (read(3, &c, 1) < 0 && errno == EINTR)
            ;
        for (uint32_t i = 0; i < k; i++)
            set_hwtstamp(4, keep[i].name, &keep[i].cfg);
        _exit(0);
    }
    close(p[0]);    /* p[1] stays open until the broker is gone */
    return 0;
}

void pkb_ring_close(pkb_ring *r)
{
    if (!r)
        return;
    if (r->hw_saved && r->fd >= 0)
        set_hwtstamp(r->fd, r->ifname, &r->hw_before);
    if (r->map != MAP_FAILED)
        munmap(r->map, r->map_size);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}
