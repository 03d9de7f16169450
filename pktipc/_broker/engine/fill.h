/*
 * Placing frames in a slab, for every engine alike: descriptors grow up from
 * the slab's start, frames grow down from its end, until they would meet.
 * (Not read by cffi: the engines' shared inline part. It includes ingest.h
 * and flowhash.h, which cffi reads and so have no include guard: include
 * this instead of them.)
 */
#ifndef PKB_FILL_H
#define PKB_FILL_H

#include <stdint.h>

#include "pktipc_shm.h"
#include "ingest.h"
#include "flowhash.h"

/* Where a frame of `caplen` bytes goes in f's slab, aligned, with room for
 * its descriptor too; 0 when it does not fit (descriptors start at offset
 * 0, so no frame does). Nothing is taken until pkb_fill_add. */
static inline uint32_t pkb_fill_room(const struct pkb_fill *f, uint32_t caplen)
{
    uint64_t room = ((uint64_t)caplen + PKTIPC_FRAME_ALIGN - 1) & ~(uint64_t)(PKTIPC_FRAME_ALIGN - 1);
    uint64_t desc_end = (uint64_t)(f->count + 1) * sizeof(struct pktipc_pkt);
    if (room + desc_end > f->data_low)
        return 0;
    return f->data_low - (uint32_t)room;
}

/* The next descriptor, for the frame at `frame` (in the slab or in the
 * frame area), `off` bytes from the slab's start; its flow hash read from
 * there, unless f says no_hash. The caller checked there is room. */
static inline void pkb_fill_desc(struct pkb_fill *f, const uint8_t *frame, uint32_t off,
                                 int64_t ts, uint32_t caplen, uint32_t wirelen,
                                 uint16_t linktype, uint16_t vlan_tci, uint16_t flags)
{
    struct pktipc_pkt *d = (struct pktipc_pkt *)f->slab + f->count;
    d->ts_ns = ts;
    d->data_off = off;
    d->caplen = caplen;
    d->wirelen = wirelen;
    d->hash = f->no_hash ? 0 : pkb_flow_hash(frame, caplen, linktype, f->hash_opts);
    d->iface = (uint16_t)f->iface;
    d->linktype = linktype;
    d->vlan_tci = vlan_tci;
    d->flags = f->no_hash ? flags | PKTIPC_F_NO_HASH : flags;
    if (f->count == 0)
        f->first_ts_ns = ts;
    f->last_ts_ns = ts;
    f->bytes += caplen;
    f->count++;
}

/* The descriptor of the frame now at `off` (pkb_fill_room's), copied into
 * the slab. */
static inline void pkb_fill_add(struct pkb_fill *f, uint32_t off, int64_t ts, uint32_t caplen,
                                uint32_t wirelen, uint16_t linktype, uint16_t vlan_tci,
                                uint16_t flags)
{
    pkb_fill_desc(f, f->slab + off, off, ts, caplen, wirelen, linktype, vlan_tci, flags);
    f->data_low = off;
}

#endif /* PKB_FILL_H */
