/*
 * libFuzzer target: the flow hash (flowhash.c) over arbitrary frames. The
 * input's first byte picks the link type (low bits) and tunnel hashing (top
 * bit); the rest is the frame, in a heap block of exactly its size, so that
 * reading past its captured length is an error. Beyond never crashing, the
 * hash keeps what shm/LAYOUT.md promises for any bytes, not only for
 * well-formed packets:
 *   - a VLAN tag in front of an Ethernet frame's type changes nothing;
 *   - the same ethertype and payload hash alike behind Linux cooked v1 and
 *     v2 and Cisco HDLC headers, and alike on Ethernet where that is not 0;
 *   - an IP packet hashes as it does on Ethernet and behind BSD loopback;
 *   - without tunnel hashing, a raw IP packet with its addresses (and ports,
 *     where they are read) swapped hashes alike.
 */
#include <stdint.h>
#include <string.h>

#include "pktipc_shm.h"
#include "flowhash.h"
#include "harness.h"

#define ETH 1
#define RAW 101
#define IPV4 228
#define IPV6 229
#define SLL 113
#define SLL2 276
#define NULL_LOOP 0
#define LOOP 108
#define HDLC 104
static const uint32_t LINKTYPES[] = {ETH, RAW, IPV4, IPV6, SLL, SLL2, NULL_LOOP, LOOP, HDLC, 127};
#define NLINKTYPES (sizeof(LINKTYPES) / sizeof(LINKTYPES[0]))

/* The hash of head[0..hn) followed by body[0..bn), in one exact heap block. */
static uint32_t hash2(const uint8_t *head, uint32_t hn, const uint8_t *body, uint32_t bn,
                      uint32_t linktype, uint32_t opts)
{
    uint8_t *f = malloc(hn + bn);
    CHECK(f || !(hn + bn), "out of memory");
    if (hn)
        memcpy(f, head, hn);
    if (bn)
        memcpy(f + hn, body, bn);
    uint32_t h = pkb_flow_hash(f, hn + bn, linktype, opts);
    free(f);
    return h;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static int is_tag(uint16_t type) { return type == 0x8100 || type == 0x88a8 || type == 0x9100; }

static void swap_bytes(uint8_t *a, uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t t = a[i];
        a[i] = b[i];
        b[i] = t;
    }
}

/* The same IP packet from the other end: 1, or 0 when it cannot be told
 * where its ports are. */
static int reverse_ip(uint8_t *p, uint32_t n)
{
    uint32_t l4;
    uint8_t proto;
    if (n >= 20 && p[0] >> 4 == 4) {
        swap_bytes(p + 12, p + 16, 4);
        l4 = 4u * (p[0] & 0x0f);
        proto = rd16(p + 6) & 0x3fff ? 0 : p[9];     /* fragments: no ports read */
    } else if (n >= 40 && p[0] >> 4 == 6) {
        swap_bytes(p + 8, p + 24, 16);
        l4 = 40;
        proto = p[6];
        switch (proto) {
        case 0: case 43: case 44: case 51: case 60: case 135:
            return 0;       /* extension headers: the ports are further on */
        }
    } else {
        return 1;           /* nothing is hashed: 0 either way */
    }
    if ((proto == 6 || proto == 17 || proto == 132) && l4 >= 20 && l4 <= n && n - l4 >= 4)
        swap_bytes(p + l4, p + l4 + 2, 2);
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > UINT16_MAX)
        return 0;
    const uint32_t linktype = LINKTYPES[(data[0] & 0x7f) % NLINKTYPES];
    const uint32_t opts = data[0] & 0x80 ? PKB_HASH_TUNNELS : 0;
    const uint8_t *frame = data + 1;
    const uint32_t n = (uint32_t)size - 1;

    const uint32_t h = hash2(NULL, 0, frame, n, linktype, opts);
    CHECK(h == hash2(NULL, 0, frame, n, linktype, opts), "the same frame hashes otherwise");

    if (linktype == ETH && n >= 14) {
        const uint16_t type = rd16(frame + 12);
        if (!is_tag(type)) {
            uint8_t head[16];
            memcpy(head, frame, 12);
            memcpy(head + 12, "\x81\x00\x00\x64", 4);
            CHECK(hash2(head, 16, frame + 12, n - 12, ETH, opts) == h, "a VLAN tag changes it");
        }
        /* The ethertype and what follows behind three other link headers. */
        uint8_t sll[16] = {0, 0, 0, 1, 0, 6}, sll2[20] = {0}, hdlc[4] = {0x0f, 0};
        memcpy(sll + 14, frame + 12, 2);
        memcpy(sll2, frame + 12, 2);
        memcpy(hdlc + 2, frame + 12, 2);
        const uint32_t cooked = hash2(sll, 16, frame + 14, n - 14, SLL, opts);
        CHECK(hash2(sll2, 20, frame + 14, n - 14, SLL2, opts) == cooked, "cooked v2 differs");
        CHECK(hash2(hdlc, 4, frame + 14, n - 14, HDLC, opts) == cooked, "HDLC differs");
        CHECK(!cooked || cooked == h, "Ethernet %#x, cooked %#x", h, cooked);
        if (type == 0x0800 || type == 0x86dd) {
            const uint32_t ip = hash2(NULL, 0, frame + 14, n - 14, type == 0x0800 ? IPV4 : IPV6,
                                      opts);
            CHECK(ip == cooked, "IP %#x, cooked %#x", ip, cooked);
            const uint8_t af[4] = {type == 0x0800 ? 2 : 24, 0, 0, 0};
            CHECK(hash2(af, 4, frame + 14, n - 14, NULL_LOOP, opts) == ip, "BSD loopback");
        }
    }

    if ((linktype == RAW || linktype == IPV4 || linktype == IPV6) && !opts && n) {
        uint8_t *rev = malloc(n);
        CHECK(rev, "out of memory");
        memcpy(rev, frame, n);
        if (reverse_ip(rev, n))
            CHECK(pkb_flow_hash(rev, n, linktype, 0) == h, "the other direction differs");
        free(rev);
    }
    return 0;
}
