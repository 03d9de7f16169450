/*
 * libpktipc: giving packets back, from any thread, without a lock, and the
 * records of mappings and slots that path reads (see OWNERSHIP in client.h).
 * A reviewer of the lock-free part reads this file alone.
 */
#define _GNU_SOURCE
#include "client.h"

/* --- mappings -------------------------------------------------------------------- */

/* The slot of a descriptor given to the user (a copy in the share area),
 * and its position there; NULL if it is none. */
static struct slot *find_slot(struct map *m, uintptr_t p, uint32_t *i)
{
    uintptr_t share = (uintptr_t)atomic_load_explicit(&m->share, memory_order_acquire);
    uintptr_t size = (uintptr_t)m->slots_cap * m->pkts_cap * sizeof(struct pktipc_pkt);
    if (!share || p < share || p - share >= size || (p - share) % sizeof(struct pktipc_pkt) ||
        !atomic_load_explicit(&m->hi, memory_order_acquire))
        return NULL;
    uintptr_t k = (p - share) / sizeof(struct pktipc_pkt);
    *i = (uint32_t)(k % m->pkts_cap);
    return &m->slots[k / m->pkts_cap];
}

struct slot *slot_of(const pktipc_client *c, const struct pktipc_pkt *p, uint32_t *i)
{
    struct map *cur = atomic_load_explicit(&((pktipc_client *)c)->cur, memory_order_acquire);
    struct slot *s = cur ? find_slot(cur, (uintptr_t)p, i) : NULL;
    struct map *m = atomic_load_explicit(&((pktipc_client *)c)->maps, memory_order_acquire);
    for (; !s && m; m = m->next)
        if (m != cur)
            s = find_slot(m, (uintptr_t)p, i);
    return s;
}

/* A record able to hold `count` slabs of `size` bytes: an unused one, or a new one. */
struct map *map_record(pktipc_client *c, uint32_t count, uint32_t size)
{
    uint32_t words = (size / PKTIPC_DESC_SIZE + WORD_BITS - 1) / WORD_BITS;
    struct map *m = atomic_load_explicit(&c->maps, memory_order_relaxed);
    for (; m; m = m->next)
        if (!m->base && m->slots_cap >= count && m->words_cap >= words)
            break;
    if (!m) {
        m = calloc(1, sizeof(*m));
        if (!m)
            return NULL;
        m->pkts_cap = words * WORD_BITS;
        m->slots = calloc(count, sizeof(*m->slots));
        /* Zeroed pages cost nothing until a batch that large comes. */
        m->bits = calloc((size_t)count * words, sizeof(*m->bits));
        if (!m->slots || !m->bits) {
            free(m->slots);
            free(m->bits);
            free(m);
            return NULL;
        }
        m->slots_cap = count;
        m->words_cap = words;
        for (uint32_t i = 0; i < count; i++) {
            m->slots[i].map = m;
            m->slots[i].done = m->bits + (size_t)i * words;
        }
        m->next = atomic_load_explicit(&c->maps, memory_order_relaxed);
        /* Make sure the record is complete before a releasing thread finds it. */
        atomic_store_explicit(&c->maps, m, memory_order_release);
    }
    return m;
}

/* The record's share area, mapped at its first share: 0, or -1. */
int map_share_area(struct map *m)
{
    if (atomic_load_explicit(&m->share, memory_order_relaxed))
        return 0;
    size_t n = (size_t)m->slots_cap * m->pkts_cap;
    /* Pages are taken only as shares fill them. */
    void *p = mmap(NULL, n * (sizeof(struct pktipc_pkt) + sizeof(uint32_t)),
                   PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    m->index = (uint32_t *)((struct pktipc_pkt *)p + n);
    /* Make sure the record's fields are seen with the area by a releasing thread. */
    atomic_store_explicit(&m->share, p, memory_order_release);
    return 0;
}

void map_free(struct map *m)
{
    struct pktipc_pkt *share = atomic_load_explicit(&m->share, memory_order_relaxed);
    if (m->base)
        munmap(m->base, m->size);
    if (share)
        munmap(share, (size_t)m->slots_cap * m->pkts_cap *
                          (sizeof(struct pktipc_pkt) + sizeof(uint32_t)));
    free(m->slots);
    free(m->bits);
    free(m);
}

void map_retire(struct map *m)
{
    /* Make sure no release matches the range once it is unmapped. */
    atomic_store_explicit(&m->hi, 0, memory_order_release);
    munmap(m->base, m->size);
    m->base = NULL;
}

/* --- releasing (any thread) --------------------------------------------------- */

static void slot_done(pktipc_client *c, struct slot *s)
{
    struct slot *head = atomic_load_explicit(&c->done, memory_order_relaxed);
    do
        s->next_done = head;
    while (!atomic_compare_exchange_weak_explicit(&c->done, &head, s, memory_order_release,
                                                  memory_order_relaxed));
    /* Only the first slot on an empty stack wakes the consumer: it takes
     * the whole stack at once. */
    if (!head) {
        uint64_t one = 1;
        ssize_t w;
        do
            w = write(c->evfd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
    }
}

PKTIPC_API int pktipc_release(pktipc_client *c, const struct pktipc_pkt *p)
{
    if (!c || !p)
        return -PKTIPC_EINVAL;
    uint32_t i;
    struct slot *s = slot_of(c, p, &i);
    if (!s)
        return -PKTIPC_EFOREIGN;
    if (atomic_load_explicit(&s->words_left, memory_order_acquire) == 0)
        return atomic_load_explicit(&s->ticket, memory_order_relaxed) ? -PKTIPC_EALREADY
                                                                      : -PKTIPC_EFOREIGN;
    if (i >= s->count)
        return -PKTIPC_EFOREIGN;
    /* One atomic operation per packet: the one that fills a word of the
     * bitmap counts the word, the one that counts the last word frees the slab. */
    uint64_t bit = UINT64_C(1) << (i % WORD_BITS);
    uint64_t old = atomic_fetch_or_explicit(&s->done[i / WORD_BITS], bit, memory_order_acq_rel);
    if (old & bit)
        return -PKTIPC_EALREADY;
    if ((old | bit) == ~UINT64_C(0) &&
        atomic_fetch_sub_explicit(&s->words_left, 1, memory_order_acq_rel) == 1)
        slot_done(c, s);
    return 0;
}

static int client_has_slot(const pktipc_client *c, const struct slot *s)
{
    struct map *m = atomic_load_explicit(&((pktipc_client *)c)->maps, memory_order_acquire);
    for (; m; m = m->next) {
        uintptr_t first = (uintptr_t)m->slots, p = (uintptr_t)s;
        if (p >= first && p < first + (uintptr_t)m->slots_cap * sizeof(*s))
            return (p - first) % sizeof(*s) == 0;
    }
    return 0;
}

PKTIPC_API int pktipc_release_batch(pktipc_client *c, struct pktipc_batch *b)
{
    if (!c || !b)
        return -PKTIPC_EINVAL;
    struct slot *s = b->slot_;
    if (!s || !client_has_slot(c, s))
        return -PKTIPC_EFOREIGN;
    if (!b->ticket_ || atomic_load_explicit(&s->ticket, memory_order_acquire) != b->ticket_ ||
        atomic_load_explicit(&s->words_left, memory_order_acquire) == 0)
        return -PKTIPC_EALREADY;
    uint32_t filled = 0, released = 0;
    for (uint32_t w = 0; w * WORD_BITS < s->count; w++) {
        uint64_t old = atomic_fetch_or_explicit(&s->done[w], ~UINT64_C(0), memory_order_acq_rel);
        if (old != ~UINT64_C(0)) {
            filled++;
            released += (uint32_t)__builtin_popcountll(~old);
        }
    }
    if (!released)
        return -PKTIPC_EALREADY;
    if (atomic_fetch_sub_explicit(&s->words_left, filled, memory_order_acq_rel) == filled)
        slot_done(c, s);
    return 0;
}

PKTIPC_API const uint8_t *pktipc_pkt_data(const pktipc_client *c, const struct pktipc_pkt *p)
{
    if (!c || !p)
        return NULL;
    uint32_t i;
    struct slot *s = slot_of(c, p, &i);
    if (!s)
        return NULL;
    struct map *m = s->map;
    return m->slabs + (size_t)(s - m->slots) * m->slab_size + p->data_off;
}
