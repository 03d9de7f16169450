/*
 * pktipc shared-memory layout for C consumers.
 *
 * Include this file, never pktipc_layout.h directly. It pins every size and
 * offset of the layout, so a compiler that lays a struct out differently
 * refuses to build instead of reading the wrong bytes, and it adds inline
 * accessors over a mapped segment.
 */
#ifndef PKTIPC_SHM_H
#define PKTIPC_SHM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pktipc_layout.h"

/* Helpers marked PKTIPC_INLINE are static inline here; pktipc_shm.c
 * compiles them as real symbols (prototypes in pktipc_shm_ffi.h) for FFI
 * users, which cannot call an inline function. */
#ifndef PKTIPC_INLINE
#define PKTIPC_INLINE static inline
#endif

/* C++ programs (Zeek is one) include this file too. */
#ifdef __cplusplus
#define PKTIPC_STATIC_ASSERT static_assert
#else
#define PKTIPC_STATIC_ASSERT _Static_assert
#endif

/* Pins a field's offset and width, so neither moving a field nor narrowing
 * it into implicit padding goes unnoticed. */
#define PKTIPC_ASSERT_AT(type, field, off, size)                                       \
    PKTIPC_STATIC_ASSERT(offsetof(struct type, field) == (off), #type "." #field " moved"); \
    PKTIPC_STATIC_ASSERT(sizeof(((struct type *)0)->field) == (size), #type "." #field " resized")

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_pkt) == PKTIPC_DESC_SIZE, "descriptor size");
PKTIPC_ASSERT_AT(pktipc_pkt, ts_ns, 0, 8);
PKTIPC_ASSERT_AT(pktipc_pkt, data_off, 8, 4);
PKTIPC_ASSERT_AT(pktipc_pkt, caplen, 12, 4);
PKTIPC_ASSERT_AT(pktipc_pkt, wirelen, 16, 4);
PKTIPC_ASSERT_AT(pktipc_pkt, hash, 20, 4);
PKTIPC_ASSERT_AT(pktipc_pkt, iface, 24, 2);
PKTIPC_ASSERT_AT(pktipc_pkt, linktype, 26, 2);
PKTIPC_ASSERT_AT(pktipc_pkt, vlan_tci, 28, 2);
PKTIPC_ASSERT_AT(pktipc_pkt, flags, 30, 2);

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_counters) == 64, "counters: one cache line");
PKTIPC_ASSERT_AT(pktipc_counters, packets, 0, 8);
PKTIPC_ASSERT_AT(pktipc_counters, bytes, 8, 8);
PKTIPC_ASSERT_AT(pktipc_counters, batches, 16, 8);
PKTIPC_ASSERT_AT(pktipc_counters, broker_drops, 24, 8);
PKTIPC_ASSERT_AT(pktipc_counters, client_drops, 32, 8);
PKTIPC_ASSERT_AT(pktipc_counters, protocol_errors, 40, 8);
PKTIPC_ASSERT_AT(pktipc_counters, clients, 48, 8);
PKTIPC_ASSERT_AT(pktipc_counters, clients_total, 56, 8);

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_iface) == PKTIPC_IFACE_SIZE, "iface size");
PKTIPC_ASSERT_AT(pktipc_iface, name, 0, 48);
PKTIPC_ASSERT_AT(pktipc_iface, ifindex, 48, 4);
PKTIPC_ASSERT_AT(pktipc_iface, linktype, 52, 4);
PKTIPC_ASSERT_AT(pktipc_iface, snaplen, 56, 4);
PKTIPC_ASSERT_AT(pktipc_iface, ts_resolution, 60, 4);
PKTIPC_ASSERT_AT(pktipc_iface, packets, 64, 8);
PKTIPC_ASSERT_AT(pktipc_iface, bytes, 72, 8);
PKTIPC_ASSERT_AT(pktipc_iface, kernel_packets, 80, 8);
PKTIPC_ASSERT_AT(pktipc_iface, kernel_drops, 88, 8);
PKTIPC_ASSERT_AT(pktipc_iface, kernel_freezes, 96, 8);
PKTIPC_ASSERT_AT(pktipc_iface, kind, 104, 4);
PKTIPC_ASSERT_AT(pktipc_iface, reserved1, 112, 16);

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_header) == PKTIPC_HEADER_SIZE, "header: one page");
PKTIPC_ASSERT_AT(pktipc_header, magic, 0, 8);
PKTIPC_ASSERT_AT(pktipc_header, layout_version, 8, 4);
PKTIPC_ASSERT_AT(pktipc_header, header_size, 12, 4);
PKTIPC_ASSERT_AT(pktipc_header, epoch, 16, 8);
PKTIPC_ASSERT_AT(pktipc_header, start_time_ns, 24, 8);
PKTIPC_ASSERT_AT(pktipc_header, broker_pid, 32, 4);
PKTIPC_ASSERT_AT(pktipc_header, state, 36, 4);
PKTIPC_ASSERT_AT(pktipc_header, slab_size, 40, 4);
PKTIPC_ASSERT_AT(pktipc_header, slab_count, 44, 4);
PKTIPC_ASSERT_AT(pktipc_header, desc_size, 48, 4);
PKTIPC_ASSERT_AT(pktipc_header, batch_rec_size, 52, 4);
PKTIPC_ASSERT_AT(pktipc_header, iface_count, 56, 4);
PKTIPC_ASSERT_AT(pktipc_header, iface_size, 60, 4);
PKTIPC_ASSERT_AT(pktipc_header, iface_table_off, 64, 8);
PKTIPC_ASSERT_AT(pktipc_header, batch_table_off, 72, 8);
PKTIPC_ASSERT_AT(pktipc_header, slabs_off, 80, 8);
PKTIPC_ASSERT_AT(pktipc_header, total_size, 88, 8);
PKTIPC_ASSERT_AT(pktipc_header, frames_off, 96, 8);
PKTIPC_ASSERT_AT(pktipc_header, frame_size, 104, 4);
PKTIPC_ASSERT_AT(pktipc_header, frame_count, 108, 4);
PKTIPC_ASSERT_AT(pktipc_header, reserved0, 112, 16);
PKTIPC_ASSERT_AT(pktipc_header, name, 128, 64);
PKTIPC_ASSERT_AT(pktipc_header, counters, 192, 64);
PKTIPC_ASSERT_AT(pktipc_header, reserved1, 256, 3840);

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_batch_rec) == PKTIPC_BATCH_REC_SIZE, "batch record");
PKTIPC_ASSERT_AT(pktipc_batch_rec, seq, 0, 8);
PKTIPC_ASSERT_AT(pktipc_batch_rec, slab, 8, 4);
PKTIPC_ASSERT_AT(pktipc_batch_rec, gen, 12, 4);
PKTIPC_ASSERT_AT(pktipc_batch_rec, count, 16, 4);
PKTIPC_ASSERT_AT(pktipc_batch_rec, data_bytes, 20, 4);
PKTIPC_ASSERT_AT(pktipc_batch_rec, first_ts_ns, 24, 8);
PKTIPC_ASSERT_AT(pktipc_batch_rec, last_ts_ns, 32, 8);
PKTIPC_ASSERT_AT(pktipc_batch_rec, kernel_drops, 40, 8);
PKTIPC_ASSERT_AT(pktipc_batch_rec, broker_drops, 48, 8);
PKTIPC_ASSERT_AT(pktipc_batch_rec, flags, 56, 4);

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_tx_header) == PKTIPC_TX_HEADER_SIZE, "TX header");
PKTIPC_ASSERT_AT(pktipc_tx_header, magic, 0, 8);
PKTIPC_ASSERT_AT(pktipc_tx_header, layout_version, 8, 4);
PKTIPC_ASSERT_AT(pktipc_tx_header, header_size, 12, 4);
PKTIPC_ASSERT_AT(pktipc_tx_header, frame_count, 16, 4);
PKTIPC_ASSERT_AT(pktipc_tx_header, frame_size, 20, 4);
PKTIPC_ASSERT_AT(pktipc_tx_header, desc_size, 24, 4);
PKTIPC_ASSERT_AT(pktipc_tx_header, desc_off, 32, 8);
PKTIPC_ASSERT_AT(pktipc_tx_header, frames_off, 40, 8);
PKTIPC_ASSERT_AT(pktipc_tx_header, total_size, 48, 8);
PKTIPC_ASSERT_AT(pktipc_tx_header, reserved1, 56, 8);

PKTIPC_STATIC_ASSERT(sizeof(struct pktipc_tx_desc) == PKTIPC_TX_DESC_SIZE, "TX descriptor");
PKTIPC_ASSERT_AT(pktipc_tx_desc, len, 0, 4);
PKTIPC_ASSERT_AT(pktipc_tx_desc, iface, 4, 2);
PKTIPC_ASSERT_AT(pktipc_tx_desc, flags, 6, 2);
PKTIPC_ASSERT_AT(pktipc_tx_desc, reserved, 8, 8);

#undef PKTIPC_ASSERT_AT
#undef PKTIPC_STATIC_ASSERT

/* Where a segment's regions start, for `slab_size` bytes per slab (a
 * multiple of PKTIPC_SLAB_ALIGN, at most PKTIPC_MAX_SLAB_SIZE),
 * `slab_count` slabs (PKTIPC_MIN_SLABS to PKTIPC_MAX_SLABS), `iface_count`
 * sources (at most PKTIPC_MAX_IFACES) and a frame area of `frame_count`
 * frames of `frame_size` bytes (a power of two from PKTIPC_MIN_FRAME_SIZE to
 * PKTIPC_MAX_FRAME_SIZE; both 0: no frame area): 0, or -1 when one of them
 * is out of bounds. A frame area ends at most 4 GiB past the first slab, so
 * that a descriptor's 32-bit data_off reaches all of it from any slab. The
 * one computation of the layout's geometry: the broker lays segments out
 * with it, readers check them with it. */
PKTIPC_INLINE int pktipc_geometry(uint32_t slab_size, uint32_t slab_count, uint32_t iface_count,
                                  uint32_t frame_size, uint32_t frame_count,
                                  struct pktipc_geometry *g)
{
    if (slab_size == 0 || slab_size % PKTIPC_SLAB_ALIGN || slab_size > PKTIPC_MAX_SLAB_SIZE ||
        slab_count < PKTIPC_MIN_SLABS || slab_count > PKTIPC_MAX_SLABS ||
        iface_count > PKTIPC_MAX_IFACES)
        return -1;
    if (frame_count ? frame_size < PKTIPC_MIN_FRAME_SIZE || frame_size > PKTIPC_MAX_FRAME_SIZE ||
                      (frame_size & (frame_size - 1))
                    : frame_size != 0)
        return -1;
    /* Bounded as above, none of this comes near 2^64. */
    g->iface_table_off = PKTIPC_HEADER_SIZE;
    g->batch_table_off = (g->iface_table_off + (uint64_t)iface_count * PKTIPC_IFACE_SIZE + 63)
                         & ~(uint64_t)63;
    g->slabs_off = (g->batch_table_off + (uint64_t)slab_count * PKTIPC_BATCH_REC_SIZE +
                    PKTIPC_SLAB_ALIGN - 1) & ~(uint64_t)(PKTIPC_SLAB_ALIGN - 1);
    g->frames_off = g->slabs_off + (uint64_t)slab_size * slab_count;
    g->total_size = g->frames_off + (uint64_t)frame_size * frame_count;
    if (frame_count && g->total_size - g->slabs_off > (uint64_t)UINT32_MAX + 1)
        return -1;
    return 0;
}

/* Copies the header of the segment at `base` (`size` bytes mapped) into *h
 * and checks the copy: 0 when it describes a layout this header reads,
 * laid out as pktipc_geometry says, within the mapping; -1 otherwise. The
 * broker may write the segment at any time: read every offset and size from
 * *h from then on, never again from the segment. */
PKTIPC_INLINE int pktipc_shm_attach(const void *base, uint64_t size, struct pktipc_header *h)
{
    struct pktipc_geometry g;
    if (size < PKTIPC_HEADER_SIZE)
        return -1;
    memcpy(h, base, sizeof(*h));
    if (h->magic != PKTIPC_MAGIC || h->layout_version != PKTIPC_LAYOUT_VERSION ||
        h->header_size != PKTIPC_HEADER_SIZE || h->desc_size != PKTIPC_DESC_SIZE ||
        h->batch_rec_size != PKTIPC_BATCH_REC_SIZE || h->iface_size != PKTIPC_IFACE_SIZE ||
        pktipc_geometry(h->slab_size, h->slab_count, h->iface_count, h->frame_size,
                        h->frame_count, &g) != 0 ||
        h->iface_table_off != g.iface_table_off || h->batch_table_off != g.batch_table_off ||
        h->slabs_off != g.slabs_off || h->frames_off != g.frames_off ||
        h->total_size != g.total_size || h->total_size > size)
        return -1;
    return 0;
}

/* pktipc_shm_attach without keeping the copy: 0 when the segment is sound. */
static inline int pktipc_shm_check(const void *base, uint64_t size)
{
    struct pktipc_header h;
    return pktipc_shm_attach(base, size, &h);
}

/* The regions of a segment at `base`, by its checked header copy `h`. */
static inline const struct pktipc_iface *pktipc_shm_iface(const void *base,
                                                          const struct pktipc_header *h,
                                                          uint32_t i)
{
    return (const struct pktipc_iface *)((const uint8_t *)base + h->iface_table_off) + i;
}

static inline const struct pktipc_batch_rec *pktipc_shm_batch(const void *base,
                                                              const struct pktipc_header *h,
                                                              uint32_t slab)
{
    return (const struct pktipc_batch_rec *)((const uint8_t *)base + h->batch_table_off) + slab;
}

static inline const uint8_t *pktipc_shm_slab(const void *base, const struct pktipc_header *h,
                                             uint32_t slab)
{
    return (const uint8_t *)base + h->slabs_off + (uint64_t)h->slab_size * slab;
}

/* The live header, for its counters and state (never its geometry). */
static inline const struct pktipc_header *pktipc_shm_header(const void *base)
{
    return (const struct pktipc_header *)base;
}

/* How many of the `n` descriptors at `pkts` (a copy, from slab `slab` of
 * the segment whose checked header copy is `h`; slab < h->slab_count) are
 * sound, from the first: each frame lies past the descriptors and within
 * the slab, or within the frame area. n when all are. */
PKTIPC_INLINE uint32_t pktipc_pkts_check(const struct pktipc_header *h, uint32_t slab,
                                         const struct pktipc_pkt *pkts, uint32_t n)
{
    uint64_t low = (uint64_t)n * PKTIPC_DESC_SIZE;
    /* The frame area, from the slab's start: [area, area_end). */
    uint64_t area = h->frames_off - h->slabs_off - (uint64_t)h->slab_size * slab;
    uint64_t area_end = area + (uint64_t)h->frame_size * h->frame_count;
    if (low > h->slab_size)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t start = pkts[i].data_off, end = start + pkts[i].caplen;
        if (!(start >= low && end <= h->slab_size) && !(start >= area && end <= area_end))
            return i;
    }
    return n;
}

/* Where a TX area's regions start, for `frame_count` slots (a power of two,
 * at most PKTIPC_TX_MAX_FRAMES) of `frame_size` bytes (a multiple of
 * PKTIPC_TX_FRAME_ALIGN, at most PKTIPC_TX_MAX_FRAME_SIZE): 0, or -1 when
 * one of them is out of bounds. The client lays its area out with it, the
 * broker checks the area with it. */
PKTIPC_INLINE int pktipc_tx_geometry(uint32_t frame_count, uint32_t frame_size,
                                     struct pktipc_tx_geometry *g)
{
    if (frame_count == 0 || frame_count > PKTIPC_TX_MAX_FRAMES ||
        (frame_count & (frame_count - 1)) || frame_size == 0 ||
        frame_size % PKTIPC_TX_FRAME_ALIGN || frame_size > PKTIPC_TX_MAX_FRAME_SIZE)
        return -1;
    g->desc_off = PKTIPC_SLAB_ALIGN;
    g->frames_off = (g->desc_off + (uint64_t)frame_count * PKTIPC_TX_DESC_SIZE +
                     PKTIPC_SLAB_ALIGN - 1) & ~(uint64_t)(PKTIPC_SLAB_ALIGN - 1);
    g->total_size = g->frames_off + (uint64_t)frame_count * frame_size;
    return 0;
}

/* Copies the header of the TX area at `base` (`size` bytes mapped) into *h
 * and checks the copy, as pktipc_shm_attach does for a segment: 0 when it
 * is laid out as pktipc_tx_geometry says, within the mapping; -1 otherwise.
 * Its writer may change the area at any time: read the geometry from *h. */
PKTIPC_INLINE int pktipc_tx_attach(const void *base, uint64_t size, struct pktipc_tx_header *h)
{
    struct pktipc_tx_geometry g;
    if (size < PKTIPC_TX_HEADER_SIZE)
        return -1;
    memcpy(h, base, sizeof(*h));
    if (h->magic != PKTIPC_TX_MAGIC || h->layout_version != PKTIPC_TX_LAYOUT_VERSION ||
        h->header_size != PKTIPC_TX_HEADER_SIZE || h->desc_size != PKTIPC_TX_DESC_SIZE ||
        pktipc_tx_geometry(h->frame_count, h->frame_size, &g) != 0 ||
        h->desc_off != g.desc_off || h->frames_off != g.frames_off ||
        h->total_size != g.total_size || h->total_size > size)
        return -1;
    return 0;
}

/* Slot i of a TX area (i < frame_count), by its checked header copy `h`. */
static inline struct pktipc_tx_desc *pktipc_tx_desc(void *base, const struct pktipc_tx_header *h,
                                                    uint32_t i)
{
    return (struct pktipc_tx_desc *)((uint8_t *)base + h->desc_off) + i;
}

static inline uint8_t *pktipc_tx_frame(void *base, const struct pktipc_tx_header *h, uint32_t i)
{
    return (uint8_t *)base + h->frames_off + (uint64_t)h->frame_size * i;
}

/* Descriptors stand at the start of their slab. */
static inline const struct pktipc_pkt *pktipc_slab_pkts(const uint8_t *slab)
{
    return (const struct pktipc_pkt *)slab;
}

static inline const uint8_t *pktipc_pkt_bytes(const uint8_t *slab, const struct pktipc_pkt *p)
{
    return slab + p->data_off;
}

static inline unsigned pktipc_pkt_direction(const struct pktipc_pkt *p)
{
    return (p->flags & PKTIPC_F_DIR_MASK) >> PKTIPC_F_DIR_SHIFT;
}

/*
 * Flow balancing within a group: rendezvous (highest random weight) hashing.
 * A packet whose descriptor hash is h belongs to the member whose slot s
 * gives the highest pktipc_hrw_weight(h, s). A member joining takes about
 * 1/N of the flows and a member leaving gives up only its own; a member that
 * comes back with its slot wins back the same flows. pktipc/PROTOCOL.md says
 * how a BATCH names the members a batch is divided among.
 */
/* murmur3's 64-bit finaliser: a bijection that mixes every bit into every
 * other (the flow hash in flowhash.c ends with it too). */
static inline uint64_t pktipc_fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

PKTIPC_INLINE uint64_t pktipc_hrw_weight(uint32_t hash, uint32_t slot)
{
    /* A bijection of (slot, hash): two slots never tie. */
    return pktipc_fmix64((uint64_t)slot << 32 | hash);
}

/* Index in members[0..n) of the member owning flow hash `hash`; n >= 1. */
PKTIPC_INLINE uint32_t pktipc_flow_owner(uint32_t hash, const uint32_t *members, uint32_t n)
{
    uint32_t best = 0;
    uint64_t top = pktipc_hrw_weight(hash, members[0]);
    for (uint32_t i = 1; i < n; i++) {
        uint64_t w = pktipc_hrw_weight(hash, members[i]);
        int higher = w > top;           /* conditional moves, not a branch */
        top = higher ? w : top;
        best = higher ? i : best;
    }
    return best;
}

/* A member's share of a batch of `count` packets: writes to out[] (room for
 * `count`) the indexes, in order, of the packets that are set in `mask` (bit
 * i & 7 of byte i >> 3; NULL: every packet) and, if n > 0, owned by slot
 * `me` among members[0..n). Returns how many it wrote. */
PKTIPC_INLINE uint32_t pktipc_select(const struct pktipc_pkt *pkts, uint32_t count,
                                     const uint8_t *mask, const uint32_t *members, uint32_t n,
                                     uint32_t me, uint32_t *out)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < count; i++) {
        /* Branch-free: whose packet it is follows no pattern a branch
         * predictor could learn. */
        uint32_t mine = mask ? mask[i >> 3] >> (i & 7) & 1 : 1;
        if (n)
            mine &= members[pktipc_flow_owner(pkts[i].hash, members, n)] == me;
        out[k] = i;
        k += mine;
    }
    return k;
}

/* Adds to counts[j] the packets of the batch (those set in `mask`, if not
 * NULL) owned by members[j]; n >= 1. One pass for every member's share. */
PKTIPC_INLINE void pktipc_share_counts(const struct pktipc_pkt *pkts, uint32_t count,
                                       const uint8_t *mask, const uint32_t *members, uint32_t n,
                                       uint32_t *counts)
{
    for (uint32_t i = 0; i < count; i++) {
        if (mask && !(mask[i >> 3] >> (i & 7) & 1))
            continue;
        counts[pktipc_flow_owner(pkts[i].hash, members, n)]++;
    }
}

#endif /* PKTIPC_SHM_H */
