/* What the C harnesses share: a check that aborts (a crash to libFuzzer, a
 * failure to the tests that run the check programs) and, included after
 * ingest.h, the invariants of a slab the engines filled. */
#ifndef PKTIPC_HARNESS_H
#define PKTIPC_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "pktipc_shm.h"

#define CHECK(cond, ...)                                                               \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: failed: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                              \
            fputc('\n', stderr);                                                       \
            abort();                                                                   \
        }                                                                              \
    } while (0)

/* FNV-1a: which input a report line is about (tests/cfuzz.py computes it too);
 * libFuzzer may run an input more than once. */
static inline uint64_t input_id(const uint8_t *data, size_t size)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 0x100000001b3ULL;
    return h;
}

/* xorshift64: the same pseudo-random sequence on every run of a check. */
static inline uint32_t next_rand(void)
{
    static uint64_t rng = 88172645463325252ULL;
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

#ifdef PKB_FILL_FULL     /* ingest.h: declarations only, without a guard of its own */

static inline uint64_t frame_room(uint32_t caplen)
{
    return ((uint64_t)caplen + PKTIPC_FRAME_ALIGN - 1) & ~(uint64_t)(PKTIPC_FRAME_ALIGN - 1);
}

/* A slab as a client reads it (shm/LAYOUT.md): descriptors from its start,
 * frames packed down from its end in the descriptors' order, aligned,
 * apart from each other and from the descriptors; the cursor's totals
 * agree with the descriptors. */
static inline void check_slab(const struct pkb_fill *f, uint32_t max_pkts)
{
    const struct pktipc_pkt *d = (const struct pktipc_pkt *)f->slab;
    CHECK(f->count <= max_pkts, "%u packets, at most %u", f->count, max_pkts);
    CHECK((uint64_t)f->count * sizeof(*d) <= f->data_low && f->data_low <= f->slab_size,
          "%u descriptors, frames from %u, slab of %u", f->count, f->data_low, f->slab_size);
    uint64_t end = f->slab_size, bytes = 0;
    for (uint32_t i = 0; i < f->count; i++) {
        CHECK(d[i].data_off + frame_room(d[i].caplen) == end,
              "packet %u: %u bytes at %u, the frame before it at %llu", i, d[i].caplen,
              d[i].data_off, (unsigned long long)end);
        CHECK(d[i].data_off % PKTIPC_FRAME_ALIGN == 0, "packet %u at %u", i, d[i].data_off);
        CHECK(!!(d[i].flags & PKTIPC_F_TRUNCATED) == (d[i].caplen < d[i].wirelen),
              "packet %u: flags %#x, caplen %u, wirelen %u", i, d[i].flags, d[i].caplen,
              d[i].wirelen);
        CHECK(d[i].iface == f->iface, "packet %u: iface %u", i, d[i].iface);
        end = d[i].data_off;
        bytes += d[i].caplen;
    }
    CHECK(end == f->data_low, "frames from %llu, cursor at %u", (unsigned long long)end,
          f->data_low);
    CHECK(bytes == f->bytes, "%llu bytes in frames, %llu counted", (unsigned long long)bytes,
          (unsigned long long)f->bytes);
    CHECK(!f->count || (f->first_ts_ns == d[0].ts_ns && f->last_ts_ns == d[f->count - 1].ts_ns),
          "first and last times");
}

#endif /* PKB_FILL_FULL */
#endif
