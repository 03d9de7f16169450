/* What crosses hosts: a share gathered for a message, received packets placed in a slab. */
#include <string.h>

#include "pktipc_shm.h"
#include "fill.h"        /* with ingest.h and flowhash.h */
#include "remote.h"

uint64_t pkb_gather(const uint8_t *slab, const struct pktipc_pkt *pkts, const uint32_t *idx,
                    uint32_t k, uint8_t *out, uint64_t out_size, struct pktipc_pkt *descs)
{
    uint64_t off = 0;
    for (uint32_t i = 0; i < k; i++) {
        const struct pktipc_pkt *p = &pkts[idx[i]];
        if (off + p->caplen > out_size || off > UINT32_MAX)
            break;
        memcpy(out + off, slab + p->data_off, p->caplen);
        descs[i] = *p;
        descs[i].data_off = (uint32_t)off;
        off += p->caplen;
    }
    return off;
}

uint32_t pkb_fill_copy(struct pkb_fill *f, const struct pktipc_pkt *pkts, uint32_t n,
                       const uint8_t *data, uint64_t data_len)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct pktipc_pkt *p = &pkts[i];
        if ((uint64_t)p->data_off + p->caplen > data_len)
            return i;
        uint32_t off = pkb_fill_room(f, p->caplen);
        if (!off)
            return i;
        memcpy(f->slab + off, data + p->data_off, p->caplen);
        struct pktipc_pkt *d = (struct pktipc_pkt *)f->slab + f->count;
        *d = *p;
        d->data_off = off;
        if (f->count == 0)
            f->first_ts_ns = p->ts_ns;
        f->last_ts_ns = p->ts_ns;
        f->bytes += p->caplen;
        f->data_low = off;
        f->count++;
    }
    return n;
}
