/*
 * libpktipc: the functions of pktipc.h, over the session (session.c) and
 * the release path (release.c).
 */
#define _GNU_SOURCE
#include "client.h"
#include "pktipc_linktype.h"

/* --- consuming ----------------------------------------------------------------- */

static int64_t deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? INT64_MAX : now_ns() + timeout_ms * NS_PER_MS;
}

static int next_batch(pktipc_client *c, struct pktipc_batch *b, int timeout_ms)
{
    int r = pump(c, deadline_of(timeout_ms), WANT_BATCH);
    return r == 1 ? hand_out(c, b) : r;
}

static int enter(pktipc_client *c)
{
    return atomic_flag_test_and_set_explicit(&c->busy, memory_order_acquire) ? -PKTIPC_EBUSY : 0;
}

static int leave(pktipc_client *c, int r)
{
    atomic_flag_clear_explicit(&c->busy, memory_order_release);
    return r;
}

PKTIPC_API int pktipc_next_batch(pktipc_client *c, struct pktipc_batch *b, int timeout_ms)
{
    if (!c || !b)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    return r ? r : leave(c, next_batch(c, b, timeout_ms));
}

PKTIPC_API int pktipc_dispatch(pktipc_client *c, int max, pktipc_handler cb, void *user,
                        int timeout_ms)
{
    if (!c || !cb)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    if (r)
        return r;
    if (!c->disp_active) {
        r = next_batch(c, &c->disp, timeout_ms);
        if (r <= 0)
            return leave(c, r);
        c->disp_active = 1;
        c->disp_next = 0;
    }
    uint32_t end = c->disp.count;
    if (max > 0 && (uint32_t)max < end - c->disp_next)
        end = c->disp_next + (uint32_t)max;
    for (uint32_t i = c->disp_next; i < end; i++)
        cb(user, &c->disp.pkts[i], pktipc_batch_data(&c->disp, &c->disp.pkts[i]));
    r = (int)(end - c->disp_next);
    c->disp_next = end;
    if (end == c->disp.count) {
        c->disp_active = 0;
        pktipc_release_batch(c, &c->disp);
    }
    return leave(c, r);
}

static uint64_t load64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

PKTIPC_API int pktipc_stats(pktipc_client *c, struct pktipc_stats *out, size_t sz)
{
    if (!c || !out)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    if (r)
        return r;
    pump(c, 0, WANT_NOTHING);
    struct pktipc_stats all = {0}, *st = &all;
    st->packets = c->packets;
    st->bytes = c->bytes;
    st->batches = c->batches;
    st->released = c->released;
    st->release_msgs = c->release_msgs;
    st->drops = c->drops;
    st->gaps = c->gaps;
    st->reconnects = c->conn.reconnects;
    for (struct map *m = atomic_load(&c->maps); m; m = m->next)
        st->held += m->base ? m->out : 0;
    struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
    if (m) {
        const struct pktipc_header *h = pktipc_shm_header(m->base);
        st->epoch = m->epoch;
        st->broker_packets = load64(&h->counters.packets);
        st->broker_bytes = load64(&h->counters.bytes);
        st->broker_batches = load64(&h->counters.batches);
        st->broker_drops = load64(&h->counters.broker_drops);
        st->client_drops = load64(&h->counters.client_drops);
        st->protocol_errors = load64(&h->counters.protocol_errors);
        for (uint32_t i = 0; i < m->hdr.iface_count; i++) {
            const struct pktipc_iface *f = pktipc_shm_iface(m->base, &m->hdr, i);
            st->kernel_packets += load64(&f->kernel_packets);
            st->kernel_drops += load64(&f->kernel_drops);
            st->kernel_freezes += load64(&f->kernel_freezes);
        }
    }
    st->tx_submitted = c->tx_submitted;
    st->tx_sent = c->tx_sent;
    st->tx_refused = c->tx_refused;
    st->tx_lost = c->tx_lost;
    st->filtered = c->filtered;
    /* A caller built with an older, shorter struct gets what it has room for. */
    memcpy(out, &all, sz < sizeof(all) ? sz : sizeof(all));
    return leave(c, 0);
}

/* --- sending ------------------------------------------------------------------- */

PKTIPC_API int pktipc_tx_alloc(pktipc_client *c, uint32_t len, unsigned iface, int timeout_ms,
                               uint8_t **frame)
{
    if (!c || !frame)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    return r ? r : leave(c, tx_alloc(c, len, iface, timeout_ms, frame));
}

PKTIPC_API int pktipc_tx_send(pktipc_client *c, const uint8_t *frame, uint32_t len)
{
    if (!c || !frame)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    return r ? r : leave(c, tx_send(c, frame, len));
}

PKTIPC_API int pktipc_tx_flush(pktipc_client *c, int timeout_ms)
{
    if (!c)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    return r ? r : leave(c, tx_flush(c, timeout_ms));
}

PKTIPC_API unsigned pktipc_iface_count(const pktipc_client *c)
{
    struct map *m = c ? atomic_load_explicit(&((pktipc_client *)c)->cur, memory_order_relaxed)
                      : NULL;
    return m ? m->hdr.iface_count : 0;
}

PKTIPC_API const struct pktipc_iface *pktipc_iface(const pktipc_client *c, unsigned i)
{
    if (i >= pktipc_iface_count(c))
        return NULL;
    struct map *m = atomic_load_explicit(&((pktipc_client *)c)->cur, memory_order_relaxed);
    return pktipc_shm_iface(m->base, &m->hdr, i);
}

PKTIPC_API const char *pktipc_group(const pktipc_client *c)
{
    return !c ? NULL : c->group[0] ? c->group : c->name;
}

PKTIPC_API int pktipc_balance(const pktipc_client *c)
{
    return c ? c->balance : -PKTIPC_EINVAL;
}

PKTIPC_API int pktipc_fd(const pktipc_client *c)
{
    return c ? c->epfd : -PKTIPC_EINVAL;
}

/* The options' size of version 1 of the library, the smallest it takes;
 * the end of the last field it knows (padding after it may be a newer
 * header's field); whether a caller's options of `sz` bytes hold a field. */
#define OPTS_END(field) \
    (offsetof(struct pktipc_opts, field) + sizeof(((struct pktipc_opts *)0)->field))
#define OPTS_V1_SZ offsetof(struct pktipc_opts, balance)
#define OPTS_KNOWN OPTS_END(filter)
#define OPTS_HAS(sz, field) ((sz) >= OPTS_END(field))

/* A caller's options as this library's struct (as libbpf's OPTS_VALID and
 * OPTS_HAS): any size that covers version 1's fields, what an older caller
 * did not pass at its default (zero), what a newer one passes beyond what
 * this library knows required to be zero. 0, or -1. */
static int opts_of(const struct pktipc_opts *opts, struct pktipc_opts *o)
{
    if (opts->sz < OPTS_V1_SZ)
        return -1;
    for (size_t i = OPTS_KNOWN; i < opts->sz; i++)
        if (((const uint8_t *)opts)[i])
            return -1;
    memset(o, 0, sizeof(*o));
    memcpy(o, opts, opts->sz < OPTS_KNOWN ? opts->sz : OPTS_KNOWN);
    /* Fields after version 1's, whole or not at all. */
    if (!OPTS_HAS(opts->sz, balance))
        o->balance = 0;
    if (!OPTS_HAS(opts->sz, tx_frames))
        o->tx_frames = 0;
    if (!OPTS_HAS(opts->sz, tx_frame_size))
        o->tx_frame_size = 0;
    if (!OPTS_HAS(opts->sz, filter))
        o->filter = NULL;
    struct pktipc_tx_geometry g;
    if ((o->tx_frames || o->tx_frame_size) &&
        pktipc_tx_geometry(o->tx_frames ? o->tx_frames : TX_FRAMES,
                           o->tx_frame_size ? o->tx_frame_size : TX_FRAME_SIZE, &g))
        return -1;          /* a TX area that cannot be made */
    o->sz = sizeof(*o);
    return 0;
}

PKTIPC_API const char *pktipc_version(void)
{
    return PKTIPC_VERSION;
}

PKTIPC_API int pktipc_open(const struct pktipc_opts *opts, pktipc_client **out)
{
    struct pktipc_opts o;
    if (out)
        *out = NULL;
    if (!opts || !out || opts_of(opts, &o) < 0)
        return -PKTIPC_EINVAL;
    pktipc_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -PKTIPC_ENOMEM;
    c->epfd = c->evfd = c->tfd = -1;
    atomic_flag_clear(&c->busy);
    msgpack_sbuffer_init(&c->out);
    proto_msg_init(&c->msg);
    int r = setup(c, &o);
    if (r < 0) {
        if (o.errbuf)
            snprintf(o.errbuf, PKTIPC_ERRBUF_SIZE, "%s", c->err);
        destroy(c);
        return r;
    }
    c->err[0] = 0;
    *out = c;
    return 0;
}

PKTIPC_API void pktipc_close(pktipc_client *c)
{
    if (c)
        destroy(c);
}

/* --- odds and ends ------------------------------------------------------------------ */

PKTIPC_API const char *pktipc_geterr(const pktipc_client *c)
{
    return c ? c->err : "";
}

PKTIPC_API const char *pktipc_strerror(int err)
{
    static const char *const text[] = {
        [0] = "success",
        [PKTIPC_EINVAL] = "invalid argument",
        [PKTIPC_ENOBROKER] = "no broker answers",
        [PKTIPC_EPERM] = "permission denied",
        [PKTIPC_ENAMETAKEN] = "another client has this name",
        [PKTIPC_EREFUSED] = "the broker refused the request",
        [PKTIPC_EPROTO] = "the broker broke the protocol",
        [PKTIPC_ELAYOUT] = "the broker's segment has a layout this library does not read",
        [PKTIPC_EGONE] = "the broker is gone",
        [PKTIPC_EEVICTED] = "the broker evicted this client",
        [PKTIPC_EEOS] = "end of stream",
        [PKTIPC_EALREADY] = "released already",
        [PKTIPC_EFOREIGN] = "not a packet or batch of this client",
        [PKTIPC_EBUSY] = "another thread is consuming from this client",
        [PKTIPC_EINTR] = "interrupted by a signal",
        [PKTIPC_ENOMEM] = "out of memory",
        [PKTIPC_ESYS] = "a system call failed",
        [PKTIPC_EBALANCE] = "the group balances in the other mode",
        [PKTIPC_EGROUP] = "this client's name is kept in another group",
        [PKTIPC_EUNTRUSTED] = "the broker's socket or segment is not a broker's",
        [PKTIPC_EAGAIN] = "every slot of the TX area waits for the broker",
        [PKTIPC_EFILTER] = "libpcap refused the filter",
    };
    unsigned e = err < 0 ? (unsigned)-(long)err : (unsigned)err;
    return e < sizeof(text) / sizeof(text[0]) ? text[e] : "unknown error";
}

PKTIPC_API int pktipc_linktype_to_dlt(int linktype)
{
    return pktipc_dlt_of_linktype(linktype);
}
