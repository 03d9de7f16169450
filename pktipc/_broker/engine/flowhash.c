/* The symmetric flow hash; shm/LAYOUT.md, "Flow hash", is its specification. */
#include <stdint.h>
#include <string.h>

#include "pktipc_shm.h"
#include "flowhash.h"

#define MAX_DEPTH    4   /* encapsulations followed, so crafted nesting costs little */
#define MAX_TAGS     4   /* VLAN tags skipped */
#define MAX_EXT      8   /* IPv6 extension headers (and GTP-U extensions) skipped */

#define KEY_NONE     0
#define KEY_MAC      1
#define KEY_IP4      2
#define KEY_IP6      3

/* The deepest flow read so far; a layer that cannot be read leaves the key
 * of the layer around it in place. */
struct key {
    uint32_t sets;      /* times set_key() wrote it */
    uint8_t kind;
    uint8_t proto;      /* IP protocol; 0 for fragments and MAC pairs */
    uint8_t a[16], b[16];   /* addresses, zero-padded */
    uint16_t pa, pb;    /* ports of a and b; 0 when not read */
};

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t x;
    memcpy(&x, p, 8);
    return __builtin_bswap64(x);        /* big-endian: compares as the bytes do */
}



static void set_key(struct key *k, uint8_t kind, uint8_t proto, const uint8_t *a,
                    const uint8_t *b, uint8_t alen)
{
    k->sets++;
    k->kind = kind;
    k->proto = proto;
    memset(k->a, 0, sizeof(k->a));
    memset(k->b, 0, sizeof(k->b));
    memcpy(k->a, a, alen);
    memcpy(k->b, b, alen);
    k->pa = k->pb = 0;
}

static void ether(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k);
static void ethertype(uint16_t type, const uint8_t *p, uint32_t len, int depth, uint32_t opts,
                      struct key *k);
static void ip4(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k);
static void ip6(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k);

static void ip_any(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k)
{
    if (len >= 1 && p[0] >> 4 == 4)
        ip4(p, len, depth, opts, k);
    else if (len >= 1 && p[0] >> 4 == 6)
        ip6(p, len, depth, opts, k);
}

static void gre(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k)
{
    if (len < 4 || (p[1] & 0x07) != 0 || (p[0] & 0x40))
        return;     /* not version 0, or source-routed (obsolete) */
    uint8_t flags = p[0];   /* C 0x80, K 0x20, S 0x10: each adds 4 bytes */
    uint32_t hdr = 4 + (flags & 0x80 ? 4 : 0) + (flags & 0x20 ? 4 : 0) + (flags & 0x10 ? 4 : 0);
    if (hdr > len)
        return;
    uint16_t type = rd16(p + 2);
    p += hdr;
    len -= hdr;
    switch (type) {
    case 0x88be:    /* ERSPAN: type II (with S) has an 8-byte header, type I none */
        if (!(flags & 0x10))
            ether(p, len, depth, opts, k);
        else if (len >= 8)
            ether(p + 8, len - 8, depth, opts, k);
        return;
    case 0x22eb:    /* ERSPAN type III: 12 bytes, and 8 more with the O flag */
        if (len >= 12) {
            uint32_t skip = 12 + (p[11] & 0x01 ? 8 : 0);
            if (skip <= len)
                ether(p + skip, len - skip, depth, opts, k);
        }
        return;
    case 0x6558:    /* transparent Ethernet bridging */
        ether(p, len, depth, opts, k);
        return;
    default:
        ethertype(type, p, len, depth, opts, k);
    }
}

static void gtpu(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k)
{
    /* Version 1, protocol type GTP, a G-PDU (message 255): user data. */
    if (len < 8 || p[0] >> 5 != 1 || !(p[0] & 0x10) || p[1] != 0xff)
        return;
    uint32_t hdr = 8;
    if (p[0] & 0x07) {      /* E, S or PN: sequence, N-PDU and next-extension fields */
        if (len < 12)
            return;
        hdr = 12;
        uint8_t next = p[0] & 0x04 ? p[11] : 0;
        for (int i = 0; next && i < MAX_EXT; i++) {
            if (hdr >= len || p[hdr] == 0)
                return;
            uint32_t elen = 4u * p[hdr];
            if (elen > len - hdr)
                return;
            next = p[hdr + elen - 1];
            hdr += elen;
        }
        if (next)
            return;
    }
    ip_any(p + hdr, len - hdr, depth, opts, k);
}

static void l4(uint8_t proto, const uint8_t *p, uint32_t len, int depth, uint32_t opts,
               struct key *k)
{
    int tunnels = (opts & PKB_HASH_TUNNELS) && depth < MAX_DEPTH;
    switch (proto) {
    case 6:         /* TCP */
    case 17:        /* UDP */
    case 132:       /* SCTP */
        if (len < 4)
            return;
        k->pa = rd16(p);
        k->pb = rd16(p + 2);
        if (proto == 17 && tunnels && len >= 8) {
            if (k->pa == 4789 || k->pb == 4789) {
                /* VXLAN: the I flag says a VNI is present */
                if (len >= 16 && (p[8] & 0x08))
                    ether(p + 16, len - 16, depth + 1, opts, k);
            } else if (k->pa == 2152 || k->pb == 2152) {
                gtpu(p + 8, len - 8, depth + 1, opts, k);
            }
        }
        return;
    case 4:         /* IPv4 in IP */
        if (tunnels)
            ip4(p, len, depth + 1, opts, k);
        return;
    case 41:        /* IPv6 in IP */
        if (tunnels)
            ip6(p, len, depth + 1, opts, k);
        return;
    case 47:
        if (tunnels)
            gre(p, len, depth + 1, opts, k);
        return;
    }
}

static void ip4(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k)
{
    if (len < 20 || p[0] >> 4 != 4)
        return;
    uint32_t ihl = 4u * (p[0] & 0x0f);
    if (ihl < 20)
        return;
    if (rd16(p + 6) & 0x3fff) {
        /* More fragments, or an offset: only the first fragment has the
         * ports, so no fragment is hashed on them. */
        set_key(k, KEY_IP4, 0, p + 12, p + 16, 4);
        return;
    }
    set_key(k, KEY_IP4, p[9], p + 12, p + 16, 4);
    if (ihl <= len)
        l4(p[9], p + ihl, len - ihl, depth, opts, k);
}

static void ip6(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k)
{
    if (len < 40 || p[0] >> 4 != 6)
        return;
    uint8_t nh = p[6];
    uint32_t off = 40;
    set_key(k, KEY_IP6, nh, p + 8, p + 24, 16);
    for (int i = 0; i < MAX_EXT; i++) {
        uint32_t hlen;
        switch (nh) {
        case 0:     /* hop-by-hop options */
        case 43:    /* routing */
        case 60:    /* destination options */
        case 135:   /* mobility */
            if (len - off < 8)
                return;
            hlen = 8u * (p[off + 1] + 1u);
            break;
        case 51:    /* authentication header */
            if (len - off < 8)
                return;
            hlen = 4u * (p[off + 1] + 2u);
            break;
        case 44:    /* fragment */
            if (len - off < 8)
                return;
            if (rd16(p + off + 2) & 0xfff9) {       /* an offset, or more fragments */
                k->proto = 0;
                return;
            }
            hlen = 8;       /* an atomic fragment: the whole datagram */
            break;
        default:
            k->proto = nh;
            l4(nh, p + off, len - off, depth, opts, k);
            return;
        }
        nh = p[off];
        k->proto = nh;
        if (hlen > len - off)
            return;
        off += hlen;
    }
}

static void ethertype(uint16_t type, const uint8_t *p, uint32_t len, int depth, uint32_t opts,
                      struct key *k)
{
    /* 802.1Q, 802.1ad and the older QinQ type: the flow is in the inner frame */
    for (int i = 0; (type == 0x8100 || type == 0x88a8 || type == 0x9100) && i < MAX_TAGS; i++) {
        if (len < 4)
            return;
        type = rd16(p + 2);
        p += 4;
        len -= 4;
    }
    if (type == 0x0800)
        ip4(p, len, depth, opts, k);
    else if (type == 0x86dd)
        ip6(p, len, depth, opts, k);
}

static void ether(const uint8_t *p, uint32_t len, int depth, uint32_t opts, struct key *k)
{
    if (len < 14)
        return;
    uint32_t sets = k->sets;
    ethertype(rd16(p + 12), p + 14, len - 14, depth, opts, k);
    if (k->sets == sets)        /* nothing read inside: the MAC pair */
        set_key(k, KEY_MAC, 0, p + 6, p, 6);
}

/* BSD loopback: the address family, in the writer's byte order for NULL. */
static void loopback(const uint8_t *p, uint32_t len, struct key *k, uint32_t opts)
{
    if (len < 4)
        return;
    uint32_t le = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                  (uint32_t)p[3] << 24;
    uint32_t be = (uint32_t)p[3] | (uint32_t)p[2] << 8 | (uint32_t)p[1] << 16 |
                  (uint32_t)p[0] << 24;
    uint32_t af = le < be ? le : be;
    if (af == 2)
        ip4(p + 4, len - 4, 0, opts, k);
    else if (af == 24 || af == 28 || af == 30)   /* AF_INET6 of the BSDs and Darwin */
        ip6(p + 4, len - 4, 0, opts, k);
}

uint32_t pkb_flow_hash(const uint8_t *frame, uint32_t caplen, uint32_t linktype,
                          uint32_t opts)
{
    struct key k = { .kind = KEY_NONE };
    switch (linktype) {
    case 1:         /* Ethernet */
        ether(frame, caplen, 0, opts, &k);
        break;
    case 0:         /* BSD loopback, host byte order */
    case 108:       /* BSD loopback, network byte order */
        loopback(frame, caplen, &k, opts);
        break;
    case 101:       /* raw IPv4 or IPv6 */
        ip_any(frame, caplen, 0, opts, &k);
        break;
    case 228:
        ip4(frame, caplen, 0, opts, &k);
        break;
    case 229:
        ip6(frame, caplen, 0, opts, &k);
        break;
    case 104:       /* Cisco HDLC: address, control, ethertype */
        if (caplen >= 4)
            ethertype(rd16(frame + 2), frame + 4, caplen - 4, 0, opts, &k);
        break;
    case 113:       /* Linux cooked v1: the protocol ends a 16-byte header */
        if (caplen >= 16)
            ethertype(rd16(frame + 14), frame + 16, caplen - 16, 0, opts, &k);
        break;
    case 276:       /* Linux cooked v2: the protocol starts a 20-byte header */
        if (caplen >= 20)
            ethertype(rd16(frame), frame + 20, caplen - 20, 0, opts, &k);
        break;
    }
    if (k.kind == KEY_NONE)
        return 0;

    /* Symmetry: the endpoint (address, then port) that sorts lower goes
     * first. Which one it is follows no pattern: no branch decides it. */
    uint64_t a0 = rd64(k.a), a1 = rd64(k.a + 8), b0 = rd64(k.b), b1 = rd64(k.b + 8);
    int swap = (a0 > b0) | ((a0 == b0) & ((a1 > b1) | ((a1 == b1) & (k.pa > k.pb))));
    uint64_t tail = (uint64_t)k.kind << 40 | (uint64_t)k.proto << 32 |
                    (uint32_t)(swap ? k.pb : k.pa) << 16 | (swap ? k.pa : k.pb);
    /* Five independent products, summed, then mixed: no chain through
     * the key's words, so it costs a few cycles more than one word. */
    uint64_t x = (swap ? b0 : a0) * 0x9e3779b97f4a7c15ULL +
                 (swap ? b1 : a1) * 0xc2b2ae3d27d4eb4fULL +
                 (swap ? a0 : b0) * 0x165667b19e3779f9ULL +
                 (swap ? a1 : b1) * 0x85ebca77c2b2ae63ULL +
                 tail * 0x27d4eb2f165667c5ULL;
    uint32_t h = (uint32_t)(pktipc_fmix64(x) >> 32);
    return h ? h : 1;
}
