/*
 * libpktipc: the C client. See pktipc.h for the API and its rules, and
 * proto.h for the protocol's state machine, which this file drives.
 *
 * OWNERSHIP. The consuming thread (the one in pktipc_next_batch, _dispatch
 * or _stats, one at a time) owns the ZeroMQ socket, the protocol state, the
 * queue of pending batches and every field not marked (any). Any thread may
 * release packets: it touches only a slot's `done` bits and `words_left`,
 * the client's `done` stack and its eventfd, all atomic or thread-safe. A
 * slot whose last packet is released goes onto the `done` stack; the
 * consuming thread takes the stack whole and sends one RELEASE for it all.
 *
 * Copies. The user never gets a descriptor in the segment, which the
 * broker may write at any time: a batch handed out is a copy of its
 * descriptors (the whole slab's, or this member's share of it, with their
 * indexes in the slab), contiguous, in the record's `share` area (a slab's
 * slot there holds up to pkts_cap of them), checked once copied. A slot's
 * `done` bits count positions in the copy, and a packet is known by the
 * copy's address.
 *
 * Mappings. Each broker's segment is a `struct map` record on a list that
 * only grows (records are reused, never freed before pktipc_close), so a
 * releasing thread may walk it without locks. A record's share area stays
 * with it, so its address range always means this record; `hi` is 0 while
 * the record is unused.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <pcap/dlt.h>
#include <zmq.h>

#include "pktipc.h"
#include "proto.h"

#define API __attribute__((visibility("default")))

#define NS_PER_MS       INT64_C(1000000)
#define DEFAULT_TIMEOUT (5000 * NS_PER_MS)
#define DEFAULT_RECONNECT (30000 * NS_PER_MS)
#define ATTEMPT_MAX     (1000 * NS_PER_MS)   /* one reattachment attempt, at most */
#define BACKOFF_MIN     (50 * NS_PER_MS)
#define BACKOFF_MAX     (1000 * NS_PER_MS)
#define LINGER_MS       1000                 /* for BYE to get out at close */
#define WORD_BITS       64

enum slot_state { SLOT_FREE, SLOT_PENDING, SLOT_HELD };

struct map;

struct slot {
    _Atomic uint32_t words_left;  /* (any) words of `done` not full yet; 0 unless held */
    uint32_t count;             /* packets given out */
    _Atomic uint64_t ticket;    /* which hand-out this is; 0: never held */
    uint64_t seq;
    int state;                  /* enum slot_state */
    struct map *map;
    _Atomic uint64_t *done;     /* (any) one bit per descriptor: released */
    struct slot *next_done;     /* on the client's stack of released slots */
};

struct map {
    _Atomic uintptr_t hi;       /* the slabs' end; 0 while the record is unused */
    uint8_t *base;              /* the mapping; NULL while unused */
    size_t size;
    uint64_t epoch;
    struct pktipc_header hdr;   /* the segment's header, checked, read once */
    uint32_t slab_count, slab_size;
    const uint8_t *slabs;
    uint32_t slots_cap, words_cap;                /* what the arrays hold, never less */
    uint32_t pkts_cap;          /* descriptors a slot's share can hold: words_cap bits */
    struct slot *slots;
    _Atomic uint64_t *bits;
    /* Shares: slots_cap * pkts_cap descriptors, then as many indexes; mapped
     * at the first share and kept for the record's life, so that its range
     * always means this record. */
    _Atomic(struct pktipc_pkt *) share;
    uint32_t *index;
    unsigned out;               /* slots the user holds */
    int orphan;                 /* its broker is gone: releases tell nobody */
    struct map *next;           /* set before the record is published, then fixed */
};

struct pending {
    uint64_t seq;
    uint32_t slab, n;
    uint32_t count;             /* this member's packets */
    int share;                  /* a share of the slab: indexes in the record's share area */
};

enum phase {
    PH_OPENING,     /* pktipc_open, waiting for WELCOME */
    PH_ATTACHED,
    PH_LOST,        /* the broker is lost; a new attempt at retry_at */
    PH_HELLO,       /* reattaching: HELLO sent, waiting for WELCOME until attempt_end */
    PH_DEAD,        /* sticky error */
};

struct pktipc_client {
    char name[PROTO_NAME_MAX + 1];
    char group[PROTO_NAME_MAX + 1];
    const char *policy;
    const char *balance_asked;  /* NULL: the group's */
    int balance;                /* PKTIPC_BALANCE_*, from WELCOME */
    unsigned credit_asked;
    int64_t reconnect;
    char *server;               /* as the user named it, for messages */
    char *endpoint;
    char *ipc_path;             /* NULL for tcp:// */
    int64_t owner;              /* the broker's uid (its socket's owner), -1 for tcp:// */

    void *zctx, *sock;
    int epfd, evfd, tfd;
    int64_t timer_armed;
    msgpack_sbuffer out;
    struct proto_msg msg;
    struct proto_conn conn;

    int phase;
    int sticky;                 /* -error every call returns from now on, 0 if none */
    int ended;                  /* END-OF-STREAM received */
    int64_t lost_at, retry_at, attempt_end, backoff;
    uint32_t credit;            /* the broker's, from WELCOME */

    _Atomic(struct map *) cur;
    _Atomic(struct map *) maps;
    struct pending *pend;
    unsigned pend_head, pend_len, pend_cap;
    unsigned held;              /* of the current broker: pending or out, not yet released */
    _Atomic(struct slot *) done;
    uint64_t *relq;             /* seqs to release */
    unsigned relq_len;
    uint64_t tickets;

    struct pktipc_batch disp;   /* pktipc_dispatch's batch at hand */
    uint32_t disp_next;
    int disp_active;

    uint64_t packets, bytes, batches, released, release_msgs, drops, gaps, reconnects;
    atomic_flag busy;
    char err[PKTIPC_ERRBUF_SIZE];
    char eos_err[PKTIPC_ERRBUF_SIZE];   /* why the stream ended early, "" if it did not */
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

__attribute__((format(printf, 3, 4)))
static int fail(pktipc_client *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    return -code;
}

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

static struct slot *slot_of(const pktipc_client *c, const struct pktipc_pkt *p, uint32_t *i)
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
static struct map *map_record(pktipc_client *c, uint32_t count, uint32_t size)
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
static int map_share_area(struct map *m)
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

static void map_free(struct map *m)
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

static void map_retire(struct map *m)
{
    /* Make sure no release matches the range once it is unmapped. */
    atomic_store_explicit(&m->hi, 0, memory_order_release);
    munmap(m->base, m->size);
    m->base = NULL;
}

/* "user NAME", or "uid N" for a uid with no name, in buf[64]. */
static const char *who(uid_t uid, char *buf)
{
    struct passwd pw, *r = NULL;
    char tmp[1024];
    if (getpwuid_r(uid, &pw, tmp, sizeof(tmp), &r) == 0 && r)
        snprintf(buf, 64, "user %.50s", r->pw_name);
    else
        snprintf(buf, 64, "uid %u", (unsigned)uid);
    return buf;
}

/* Maps the segment a WELCOME names; 0 or -PKTIPC_E*. */
static int map_segment(pktipc_client *c, const char *shm, uint64_t epoch)
{
    int fd = shm_open(shm, O_RDONLY, 0);
    if (fd < 0) {
        if (errno == ENOENT)
            return fail(c, PKTIPC_EGONE, "segment %s of broker '%s' is gone", shm, c->server);
        if (errno == EACCES)
            return fail(c, PKTIPC_EPERM, "segment %s: permission denied", shm);
        return fail(c, PKTIPC_ESYS, "shm_open %s: %s", shm, strerror(errno));
    }
    struct stat st;
    void *base = MAP_FAILED;
    if (fstat(fd, &st) == 0 && c->owner >= 0 && st.st_uid != (uid_t)c->owner && st.st_uid) {
        char theirs[64], broker[64];
        close(fd);
        return fail(c, PKTIPC_EUNTRUSTED, "segment %s belongs to %s, broker '%s' to %s: another "
                    "user may be posing as the broker", shm, who(st.st_uid, theirs),
                    c->server, who((uid_t)c->owner, broker));
    }
    if (st.st_size > 0)
        base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED)
        return fail(c, PKTIPC_ELAYOUT, "segment %s cannot be mapped: %s", shm, strerror(e));
    size_t size = (size_t)st.st_size;
    struct pktipc_header hdr;
    int r = 0;
    if (pktipc_shm_attach(base, size, &hdr) != 0)
        r = fail(c, PKTIPC_ELAYOUT, "segment %s is not a layout %d segment", shm,
                 PKTIPC_LAYOUT_VERSION);
    else if (hdr.epoch != epoch)
        r = fail(c, PKTIPC_ELAYOUT, "segment %s: its epoch differs from the broker's", shm);
    struct map *m = r ? NULL : map_record(c, hdr.slab_count, hdr.slab_size);
    if (!r && !m)
        r = fail(c, PKTIPC_ENOMEM, "out of memory");
    if (r) {
        munmap(base, size);
        return r;
    }
    m->base = base;
    m->size = size;
    m->epoch = epoch;
    m->hdr = hdr;
    m->slab_count = hdr.slab_count;
    m->slab_size = hdr.slab_size;
    m->slabs = pktipc_shm_slab(base, &m->hdr, 0);
    m->out = 0;
    m->orphan = 0;
    atomic_store_explicit(&m->hi, (uintptr_t)m->slabs + (uintptr_t)hdr.slab_size * hdr.slab_count,
                          memory_order_release);
    struct map *old = atomic_load_explicit(&c->cur, memory_order_relaxed);
    atomic_store_explicit(&c->cur, m, memory_order_release);
    if (old && old->out == 0)
        map_retire(old);
    return 0;
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

API int pktipc_release(pktipc_client *c, const struct pktipc_pkt *p)
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

API int pktipc_release_batch(pktipc_client *c, struct pktipc_batch *b)
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

API const uint8_t *pktipc_pkt_data(const pktipc_client *c, const struct pktipc_pkt *p)
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

/* --- the socket ------------------------------------------------------------------ */

static int sock_open(pktipc_client *c)
{
    int linger = LINGER_MS, sndtimeo = 1000, fd;
    int64_t maxsize = PROTO_MAX_BROKER_FRAME;
    size_t fdsize = sizeof(fd);
    c->sock = zmq_socket(c->zctx, ZMQ_DEALER);
    if (!c->sock)
        return fail(c, PKTIPC_ESYS, "zmq_socket: %s", zmq_strerror(errno));
    if (zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof(sndtimeo)) ||
        zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &maxsize, sizeof(maxsize)) ||
        zmq_connect(c->sock, c->endpoint) || zmq_getsockopt(c->sock, ZMQ_FD, &fd, &fdsize)) {
        int r = fail(c, errno == EINVAL || errno == EPROTONOSUPPORT ? PKTIPC_EINVAL : PKTIPC_ESYS,
                     "%s: %s", c->endpoint, zmq_strerror(errno));
        zmq_close(c->sock);
        c->sock = NULL;
        return r;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev)) {
        zmq_close(c->sock);
        c->sock = NULL;
        return fail(c, PKTIPC_ESYS, "epoll_ctl: %s", strerror(errno));
    }
    return 0;
}

static void sock_close(pktipc_client *c, int linger)
{
    int fd;
    size_t fdsize = sizeof(fd);
    if (!c->sock)
        return;
    if (zmq_getsockopt(c->sock, ZMQ_FD, &fd, &fdsize) == 0)
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, NULL);
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(c->sock);
    c->sock = NULL;
}

/* Sends what the last proto_* encoder wrote; -1 if the broker does not take it. */
static int send_out(pktipc_client *c)
{
    while (zmq_send(c->sock, c->out.data, c->out.size, 0) < 0)
        if (errno != EINTR)
            return -1;
    return 0;
}

/* --- states -------------------------------------------------------------------- */

static void drop_pending(pktipc_client *c)
{
    struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
    for (; c->pend_len; c->pend_len--) {
        m->slots[c->pend[c->pend_head].slab].state = SLOT_FREE;
        c->pend_head = (c->pend_head + 1) % c->pend_cap;
    }
}

/* Nobody will take releases for the current broker's batches any more. */
static void orphan(pktipc_client *c)
{
    struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
    drop_pending(c);
    if (m)
        m->orphan = 1;
    c->held = 0;
    c->relq_len = 0;
}

__attribute__((format(printf, 3, 4)))
static int die(pktipc_client *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    orphan(c);
    c->phase = PH_DEAD;
    c->sticky = -code;
    return -code;
}

static void retry_later(pktipc_client *c, int64_t now)
{
    c->phase = PH_LOST;
    c->retry_at = min64(now + c->backoff, c->lost_at + c->reconnect);
    c->backoff = min64(2 * c->backoff, BACKOFF_MAX);
}

/* The broker is gone (silent, or a new one that does not know us). */
static int lost(pktipc_client *c, int64_t now, const char *why)
{
    if (!c->reconnect)
        return die(c, PKTIPC_EGONE, "broker '%s' %s", c->server, why);
    orphan(c);
    sock_close(c, 0);
    c->lost_at = now;
    c->backoff = BACKOFF_MIN;
    c->phase = PH_LOST;
    c->retry_at = now;
    return 0;
}

/* A broker broke the protocol: fatal, except while looking for a new broker,
 * where the next attempt may find a proper one. */
static int violation(pktipc_client *c, int64_t now, const char *why)
{
    if (c->phase == PH_HELLO) {
        sock_close(c, 0);
        retry_later(c, now);
        return 0;
    }
    return die(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: %s", c->server, why);
}

static int send_hello(pktipc_client *c, int64_t now)
{
    proto_conn_init(&c->conn);
    if (proto_hello(&c->conn, &c->out, now, c->name, c->group[0] ? c->group : NULL, c->policy,
                    c->credit_asked, (uint32_t)getpid(), c->balance_asked))
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    if (send_out(c))
        return fail(c, PKTIPC_ENOBROKER, "broker '%s' does not take messages", c->server);
    return 0;
}

static int str_eq(const char *s, uint32_t len, const char *want)
{
    return len == strlen(want) && memcmp(s, want, len) == 0;
}

static int on_welcome(pktipc_client *c, int64_t now)
{
    const struct proto_msg *m = &c->msg;
    uint32_t len, glen, blen;
    const char *shm = proto_str(m, F_WELCOME_SHM, &len);
    const char *group = proto_str(m, F_WELCOME_GROUP, &glen);
    const char *balance = proto_str(m, F_WELCOME_BALANCE, &blen);
    char name[1024];
    int r;
    /* The broker puts a client in the group it asks for (its own by
     * default), balanced as it asks if it does, or refuses it. */
    if (!str_eq(group, glen, c->group[0] ? c->group : c->name) ||
        (c->balance_asked && !str_eq(balance, blen, c->balance_asked)))
        r = fail(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: it welcomed '%s' into "
                 "group '%.*s', balanced by %.*s", c->server, c->name, (int)glen, group,
                 (int)blen, balance);
    else if (proto_u64(m, F_WELCOME_LAYOUT) != PKTIPC_LAYOUT_VERSION)
        r = fail(c, PKTIPC_ELAYOUT, "broker '%s' uses layout %llu, this library reads %d",
                 c->server, (unsigned long long)proto_u64(m, F_WELCOME_LAYOUT),
                 PKTIPC_LAYOUT_VERSION);
    else if (!len || len >= sizeof(name) || memchr(shm, 0, len))
        r = fail(c, PKTIPC_EPROTO, "broker '%s' named an impossible segment", c->server);
    else {
        memcpy(name, shm, len);
        name[len] = 0;
        r = map_segment(c, name, proto_u64(m, F_WELCOME_EPOCH));
        if (r == 0 && (proto_mapped(&c->conn, &c->out, now) || send_out(c)))
            r = fail(c, PKTIPC_ESYS, "cannot tell broker '%s' the segment is mapped: %s",
                     c->server, zmq_strerror(errno));
    }
    if (r == 0) {
        uint32_t credit = (uint32_t)proto_u64(m, F_WELCOME_CREDIT);
        if (credit > c->pend_cap) {
            struct pending *p = realloc(c->pend, credit * sizeof(*p));
            uint64_t *q = p ? realloc(c->relq, credit * sizeof(*q)) : NULL;
            if (p)
                c->pend = p;
            if (q) {
                c->relq = q;
                c->pend_cap = credit;
            } else {
                r = fail(c, PKTIPC_ENOMEM, "out of memory");
            }
        }
        c->credit = credit;
        c->pend_head = 0;
    }
    if (r < 0) {
        if (proto_bye(&c->conn, &c->out, now) == 0)
            send_out(c);
        if (c->phase == PH_OPENING)
            return r;
        sock_close(c, 100);
        retry_later(c, now);
        return 0;
    }
    if (c->phase == PH_HELLO)
        c->reconnects++;
    c->phase = PH_ATTACHED;
    c->balance = str_eq(balance, blen, PROTO_BALANCE_FLOW) ? PKTIPC_BALANCE_FLOW
                                                           : PKTIPC_BALANCE_ROUND_ROBIN;
    return 0;
}

static int on_frame(pktipc_client *c, const void *data, size_t len, int more, int64_t now);

/* A batch that does not match its slab: the broker broke the protocol,
 * unless it evicted this client meanwhile (it was silent too long) and
 * reused the slabs of the batches still on their way here; the EVICT
 * behind them is then the news. It is sent before the slab is reused, so
 * it is on its way: it is waited for, for at most EVICT_WAIT. */
#define EVICT_WAIT (500 * NS_PER_MS)
static int mismatch(pktipc_client *c, int64_t now, const char *why)
{
    struct proto_msg m;
    char ignored[PKTIPC_ERRBUF_SIZE];
    int r = 1;
    int64_t until = now_ns() + EVICT_WAIT;
    proto_msg_init(&m);
    while (r == 1) {
        zmq_msg_t zm;
        zmq_msg_init(&zm);
        if (zmq_msg_recv(&zm, c->sock, ZMQ_DONTWAIT) < 0) {
            int64_t left = until - now_ns();
            zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
            if (errno != EAGAIN && errno != EINTR)
                r = violation(c, now, why);
            else if (left > 0 && errno == EAGAIN)
                zmq_poll(&item, 1, (long)(left / NS_PER_MS) + 1);
            else if (left <= 0)
                r = violation(c, now, why);
        } else if (proto_decode(&m, zmq_msg_data(&zm), zmq_msg_size(&zm), ignored,
                                sizeof(ignored)) == 0 && m.type == PMSG_EVICT) {
            r = on_frame(c, zmq_msg_data(&zm), zmq_msg_size(&zm), zmq_msg_more(&zm), now);
        }
        zmq_msg_close(&zm);
    }
    proto_msg_free(&m);
    return r;
}

static int on_batch(pktipc_client *c, int64_t now)
{
    const struct proto_msg *m = &c->msg;
    struct map *map = atomic_load_explicit(&c->cur, memory_order_relaxed);
    uint64_t seq = proto_u64(m, F_BATCH_SEQ);
    uint64_t slab = proto_u64(m, F_BATCH_SLAB), gen = proto_u64(m, F_BATCH_GEN);
    uint64_t n = proto_u64(m, F_BATCH_N);
    char why[160];
    if (slab >= map->slab_count) {
        snprintf(why, sizeof(why), "batch %llu names slab %llu of %u", (unsigned long long)seq,
                 (unsigned long long)slab, map->slab_count);
        return violation(c, now, why);
    }
    const struct pktipc_batch_rec *rec = pktipc_shm_batch(map->base, &map->hdr, (uint32_t)slab);
    /* Pairs with the broker's release store of seq, which it makes after
     * writing the slab and the rest of the record. */
    uint64_t rseq = __atomic_load_n(&rec->seq, __ATOMIC_ACQUIRE);
    if (rseq != seq || rec->gen != gen || rec->count != n ||
        n > map->slab_size / PKTIPC_DESC_SIZE) {
        snprintf(why, sizeof(why), "batch %llu does not match the segment",
                 (unsigned long long)seq);
        return mismatch(c, now, why);
    }
    struct slot *s = &map->slots[slab];
    if (s->state != SLOT_FREE || c->held >= c->credit) {
        snprintf(why, sizeof(why), "batch %llu: slab %llu is held already, or credit %u is "
                 "exceeded", (unsigned long long)seq, (unsigned long long)slab, c->credit);
        return violation(c, now, why);
    }
    struct pending pb = {.seq = seq, .slab = (uint32_t)slab, .n = (uint32_t)n,
                         .count = (uint32_t)n};
    uint32_t members[PROTO_MAX_MEMBERS], nmembers = proto_slots(m, F_BATCH_MEMBERS, members);
    uint32_t masklen;
    const uint8_t *mask = proto_bin(m, F_BATCH_MASK, &masklen);
    if (map_share_area(map))
        return die(c, PKTIPC_ENOMEM, "out of memory");
    if (nmembers || mask) {
        /* The share is chosen now, while the slot is the consuming thread's
         * alone; the BATCH's fields go with the message. */
        const struct pktipc_pkt *d = pktipc_slab_pkts(map->slabs + slab * map->slab_size);
        pb.count = pktipc_select(d, pb.n, mask, members, nmembers, c->conn.slot,
                                 map->index + slab * map->pkts_cap);
        pb.share = pb.count < pb.n;
        if (!pb.count) {
            snprintf(why, sizeof(why), "batch %llu holds no packet of this client",
                     (unsigned long long)seq);
            return violation(c, now, why);
        }
    }
    s->state = SLOT_PENDING;
    c->pend[(c->pend_head + c->pend_len++) % c->pend_cap] = pb;
    c->held++;
    return 0;
}

static int on_error(pktipc_client *c, int64_t now)
{
    uint32_t clen, tlen;
    const char *code = proto_str(&c->msg, F_ERROR_CODE, &clen);
    const char *text = proto_str(&c->msg, F_ERROR_TEXT, &tlen);
    if (c->phase == PH_OPENING || c->phase == PH_HELLO) {
        int taken = str_eq(code, clen, "name-taken");
        int e = taken ? PKTIPC_ENAMETAKEN
                : str_eq(code, clen, "balance-mismatch") ? PKTIPC_EBALANCE
                : str_eq(code, clen, "group-mismatch") ? PKTIPC_EGROUP
                : PKTIPC_EREFUSED;
        fail(c, e, "broker '%s' refused '%s': %.*s", c->server, c->name, (int)tlen, text);
        if (c->phase == PH_OPENING)
            return -e;
        sock_close(c, 0);
        retry_later(c, now);
        /* Its old self may linger under our name a while: only say so when
         * the refusal is another. */
        return taken ? 0 : -e;
    }
    if (str_eq(code, clen, "not-attached"))
        return lost(c, now, "restarted");
    return fail(c, PKTIPC_EREFUSED, "broker '%s' refused a request: %.*s", c->server, (int)tlen,
                text);
}

static int on_frame(pktipc_client *c, const void *data, size_t len, int more, int64_t now)
{
    char why[PKTIPC_ERRBUF_SIZE];
    if (more)
        return violation(c, now, "a message of several frames");
    if (proto_decode(&c->msg, data, len, why, sizeof(why)) ||
        proto_receive(&c->conn, &c->msg, now, why, sizeof(why))) {
        if (c->phase == PH_OPENING)
            return fail(c, PKTIPC_EPROTO, "%s is not a pktipc broker: %s", c->endpoint, why);
        return violation(c, now, why);
    }
    uint32_t n;
    const char *text;
    switch (c->msg.type) {
    case PMSG_WELCOME:
        return on_welcome(c, now);
    case PMSG_BATCH:
        return on_batch(c, now);
    case PMSG_GAP: {
        uint64_t from = proto_u64(&c->msg, F_GAP_FROM), to = proto_u64(&c->msg, F_GAP_TO);
        if (to < from)
            return violation(c, now, "a gap that ends before it starts");
        c->drops += to - from;
        c->gaps++;
        return 0;
    }
    case PMSG_EOS:
        c->ended = 1;
        text = proto_str(&c->msg, F_EOS_ERROR, &n);
        if (text)
            snprintf(c->eos_err, sizeof(c->eos_err), "stream ended early: %.*s", (int)n, text);
        return 0;
    case PMSG_ERROR:
        return on_error(c, now);
    case PMSG_EVICT:
        text = proto_str(&c->msg, F_EVICT_TEXT, &n);
        return die(c, PKTIPC_EEVICTED, "broker '%s' evicted '%s': %.*s", c->server, c->name,
                   (int)n, text);
    default:        /* heartbeat; a STATS reply nobody asked for */
        return 0;
    }
}

static int receive_all(pktipc_client *c)
{
    while (c->sock) {
        zmq_msg_t zm;
        zmq_msg_init(&zm);
        if (zmq_msg_recv(&zm, c->sock, ZMQ_DONTWAIT) < 0) {
            int e = errno;
            zmq_msg_close(&zm);
            if (e == EAGAIN)
                return 0;
            if (e == EINTR)
                continue;
            return die(c, PKTIPC_ESYS, "zmq_msg_recv: %s", zmq_strerror(e));
        }
        int r = on_frame(c, zmq_msg_data(&zm), zmq_msg_size(&zm), zmq_msg_more(&zm), now_ns());
        zmq_msg_close(&zm);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Moves released slots to the release queue; retires mappings of brokers
 * that are gone once nothing in them is held. */
static void take_released(pktipc_client *c)
{
    uint64_t v;
    /* Cleared before the stack is taken: a slot pushed after this finds the
     * stack empty and signals again. */
    while (read(c->evfd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
    struct slot *s = atomic_exchange_explicit(&c->done, NULL, memory_order_acquire);
    struct map *cur = atomic_load_explicit(&c->cur, memory_order_relaxed);
    while (s) {
        struct slot *next = s->next_done;
        struct map *m = s->map;
        s->state = SLOT_FREE;
        m->out--;
        c->released++;
        if (m == cur && !m->orphan) {
            c->relq[c->relq_len++] = s->seq;
            c->held--;
        } else if (m != cur && m->out == 0) {
            map_retire(m);
        }
        s = next;
    }
}

static int send_releases(pktipc_client *c, int64_t now)
{
    for (unsigned i = 0; i < c->relq_len && c->sock; i += PROTO_MAX_RELEASE) {
        unsigned n = c->relq_len - i < PROTO_MAX_RELEASE ? c->relq_len - i : PROTO_MAX_RELEASE;
        if (proto_release(&c->conn, &c->out, now, c->relq + i, n))
            break;      /* not attached (any more): nobody to tell */
        if (send_out(c))
            return lost(c, now, "does not take messages");
        c->release_msgs++;
    }
    c->relq_len = 0;
    return 0;
}

static int check_socket(pktipc_client *c);

static int reattach(pktipc_client *c, int64_t now)
{
    if (c->phase == PH_HELLO && now >= c->attempt_end) {
        sock_close(c, 0);
        retry_later(c, now);
    }
    if (c->phase != PH_LOST || now < c->retry_at)
        return 0;
    if (now >= c->lost_at + c->reconnect)
        return die(c, PKTIPC_EGONE, "broker '%s' stopped answering and none took its place "
                   "within %lld ms", c->server, (long long)(c->reconnect / NS_PER_MS));
    int r = check_socket(c);
    if (r == -PKTIPC_EUNTRUSTED) {
        char why[sizeof(c->err)];
        memcpy(why, c->err, sizeof(why));
        return die(c, PKTIPC_EUNTRUSTED, "%s", why);
    }
    if (r || sock_open(c) || send_hello(c, now)) {
        sock_close(c, 0);
        retry_later(c, now);
        return 0;
    }
    c->phase = PH_HELLO;
    c->attempt_end = now + min64(ATTEMPT_MAX, c->lost_at + c->reconnect - now);
    return 0;
}

static int timers(pktipc_client *c, int64_t now)
{
    if (c->phase == PH_ATTACHED) {
        switch (proto_handle_timer(&c->conn, &c->out, now)) {
        case PROTO_TIMER_SENT:
            if (send_out(c))
                return lost(c, now, "does not take messages");
            break;
        case PROTO_TIMER_LOST:
            return lost(c, now, "stopped answering");
        }
    }
    if (c->phase == PH_LOST || c->phase == PH_HELLO)
        return reattach(c, now);
    return 0;
}

static int64_t next_timer(const pktipc_client *c)
{
    switch (c->phase) {
    case PH_ATTACHED: return proto_timer(&c->conn);
    case PH_LOST: return c->retry_at;
    case PH_HELLO: return c->attempt_end;
    default: return INT64_MAX;
    }
}

/* Keeps the timerfd in pktipc_fd's set on the next thing due. */
static void arm_timer(pktipc_client *c, int64_t now)
{
    int64_t t = next_timer(c);
    if (t == c->timer_armed && t > now)
        return;
    struct itimerspec its = {0};
    if (t != INT64_MAX) {
        t = t > now ? t : now + 1;
        its.it_value.tv_sec = t / 1000000000;
        its.it_value.tv_nsec = t % 1000000000;
    }
    timerfd_settime(c->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    c->timer_armed = t;
}

/* Waits until `deadline`, a timer, a message or a release; 0 or -PKTIPC_E*. */
static int wait_for(pktipc_client *c, int64_t now, int64_t deadline)
{
    if (c->sock) {
        int events = 0;
        size_t size = sizeof(events);
        /* ZMQ_FD only signals what arrives after this says there is nothing. */
        if (zmq_getsockopt(c->sock, ZMQ_EVENTS, &events, &size) == 0 && (events & ZMQ_POLLIN))
            return 0;
    }
    if (atomic_load_explicit(&c->done, memory_order_relaxed))
        return 0;
    int64_t until = min64(deadline, next_timer(c));
    int ms = -1;
    if (until != INT64_MAX) {
        int64_t left = (until - now + NS_PER_MS - 1) / NS_PER_MS;
        ms = left < 0 ? 0 : left > 60000 ? 60000 : (int)left;
    }
    struct epoll_event ev[4];
    if (epoll_wait(c->epfd, ev, 4, ms) < 0) {
        if (errno == EINTR)
            return fail(c, PKTIPC_EINTR, "interrupted by a signal");
        return die(c, PKTIPC_ESYS, "epoll_wait: %s", strerror(errno));
    }
    return 0;
}

enum want { WANT_NOTHING, WANT_BATCH, WANT_WELCOME };

/* Does what is due, and waits until `want` comes or `deadline` passes:
 * 1 when it came, 0 at the deadline, -PKTIPC_E*. */
static int pump(pktipc_client *c, int64_t deadline, int want)
{
    for (;;) {
        int64_t now = now_ns();
        take_released(c);
        int r = receive_all(c);
        if (r == 0)
            r = timers(c, now);
        if (r == 0)
            r = send_releases(c, now);
        arm_timer(c, now);
        if (r < 0)
            return r;
        if (want == WANT_BATCH && c->pend_len)
            return 1;
        if (want == WANT_WELCOME && c->phase == PH_ATTACHED)
            return 1;
        if (c->sticky)
            return c->sticky;
        if (want == WANT_BATCH && c->ended)
            return fail(c, PKTIPC_EEOS, "%s", c->eos_err);
        if (now >= deadline)
            return 0;
        if ((r = wait_for(c, now, deadline)) < 0)
            return r;
    }
}

/* --- consuming ----------------------------------------------------------------- */

static int64_t deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? INT64_MAX : now_ns() + timeout_ms * NS_PER_MS;
}

/* Hands out the oldest pending batch: this member's packets of the slab,
 * checked, the whole slab in place or copies of a share (chosen by
 * on_batch). The release bitmap counts what was handed out, so that the
 * slab goes back once that is released. */
static int hand_out(pktipc_client *c, struct pktipc_batch *b)
{
    struct pending pb = c->pend[c->pend_head];
    c->pend_head = (c->pend_head + 1) % c->pend_cap;
    c->pend_len--;
    struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
    struct slot *s = &m->slots[pb.slab];
    const uint8_t *slab = m->slabs + (size_t)pb.slab * m->slab_size;
    const struct pktipc_pkt *d = pktipc_slab_pkts(slab);
    const uint32_t *index = NULL;
    size_t at = (size_t)pb.slab * m->pkts_cap;
    struct pktipc_pkt *copy = atomic_load_explicit(&m->share, memory_order_relaxed) + at;
    if (pb.share) {
        index = m->index + at;
        for (uint32_t i = 0; i < pb.count; i++)
            copy[i] = d[index[i]];
    } else {
        memcpy(copy, d, (size_t)pb.count * sizeof(*d));
    }
    /* Checked once copied: what the user reads is what was checked. */
    uint32_t good = pktipc_pkts_check(&m->hdr, pb.slab, copy, pb.count);
    if (good < pb.count) {
        s->state = SLOT_FREE;
        c->held--;
        return die(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: packet %u of batch %llu "
                   "lies outside its slab", c->server, index ? index[good] : good,
                   (unsigned long long)pb.seq);
    }
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < pb.count; i++)
        bytes += copy[i].caplen;
    /* Bits past the last packet are set: every word is full once released. */
    uint32_t words = (pb.count + WORD_BITS - 1) / WORD_BITS;
    for (uint32_t w = 0; w < words; w++)
        atomic_store_explicit(&s->done[w], 0, memory_order_relaxed);
    if (pb.count % WORD_BITS)
        atomic_store_explicit(&s->done[words - 1], ~UINT64_C(0) << (pb.count % WORD_BITS),
                              memory_order_relaxed);
    s->count = pb.count;
    s->seq = pb.seq;
    s->state = SLOT_HELD;
    atomic_store_explicit(&s->ticket, ++c->tickets, memory_order_relaxed);
    /* Make sure the slot is set up before a releasing thread sees it held. */
    atomic_store_explicit(&s->words_left, words, memory_order_release);
    m->out++;
    b->seq = pb.seq;
    b->count = pb.count;
    b->pkts = copy;
    b->index = index;
    b->base = slab;
    b->ticket_ = c->tickets;
    b->slot_ = s;
    c->packets += pb.count;
    c->bytes += bytes;
    c->batches++;
    return (int)pb.count;
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

API int pktipc_next_batch(pktipc_client *c, struct pktipc_batch *b, int timeout_ms)
{
    if (!c || !b)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    return r ? r : leave(c, next_batch(c, b, timeout_ms));
}

API int pktipc_dispatch(pktipc_client *c, int max, pktipc_handler cb, void *user,
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

API int pktipc_stats(pktipc_client *c, struct pktipc_stats *st)
{
    if (!c || !st)
        return -PKTIPC_EINVAL;
    int r = enter(c);
    if (r)
        return r;
    pump(c, 0, WANT_NOTHING);
    memset(st, 0, sizeof(*st));
    st->packets = c->packets;
    st->bytes = c->bytes;
    st->batches = c->batches;
    st->released = c->released;
    st->release_msgs = c->release_msgs;
    st->drops = c->drops;
    st->gaps = c->gaps;
    st->reconnects = c->reconnects;
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
    return leave(c, 0);
}

API unsigned pktipc_iface_count(const pktipc_client *c)
{
    struct map *m = c ? atomic_load_explicit(&((pktipc_client *)c)->cur, memory_order_relaxed)
                      : NULL;
    return m ? m->hdr.iface_count : 0;
}

API const struct pktipc_iface *pktipc_iface(const pktipc_client *c, unsigned i)
{
    if (i >= pktipc_iface_count(c))
        return NULL;
    struct map *m = atomic_load_explicit(&((pktipc_client *)c)->cur, memory_order_relaxed);
    return pktipc_shm_iface(m->base, &m->hdr, i);
}

API const char *pktipc_group(const pktipc_client *c)
{
    return !c ? NULL : c->group[0] ? c->group : c->name;
}

API int pktipc_balance(const pktipc_client *c)
{
    return c ? c->balance : -PKTIPC_EINVAL;
}

API int pktipc_fd(const pktipc_client *c)
{
    return c ? c->epfd : -PKTIPC_EINVAL;
}

/* --- opening and closing ---------------------------------------------------------- */

/* As pktipc/_paths.py: runtime_dir() and control_endpoint(); NULL with
 * errno EINVAL when a user has no runtime directory. */
static char *endpoint_of(const char *server)
{
    char *out = NULL;
    if (strstr(server, "://"))
        return strdup(server);
    const char *dir = getenv("PKTIPC_RUNTIME_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n;
    if (dir && *dir)
        n = asprintf(&out, "ipc://%s/%s.ctl", dir, server);
    else if (geteuid() == 0)
        n = asprintf(&out, "ipc:///run/pktipc/%s.ctl", server);
    else if (xdg && *xdg)
        n = asprintf(&out, "ipc://%s/pktipc/%s.ctl", xdg, server);
    else {
        errno = EINVAL;
        return NULL;
    }
    return n < 0 ? NULL : out;
}

#define DENIED "permission denied (a broker admits its own user, and a Unix group given " \
               "with serve --allow-group)"

/* As _check_socket in pktipc/_client/client.py: says why at once when a
 * local broker's socket is missing or not ours (ZeroMQ would retry in
 * silence), or is not what a broker makes: a socket of the runtime
 * directory's owner (or root), in a directory nobody else can write. */
static int check_socket(pktipc_client *c)
{
    struct stat st, d;
    c->owner = -1;
    if (!c->ipc_path)
        return 0;
    char *dir = strdup(c->ipc_path);
    if (!dir)
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    char *slash = strrchr(dir, '/');
    if (slash)
        *(slash == dir ? slash + 1 : slash) = 0;
    int r = 0;
    if (lstat(slash ? dir : ".", &d) || lstat(c->ipc_path, &st)) {
        if (errno == ENOENT || errno == ENOTDIR)
            r = fail(c, PKTIPC_ENOBROKER, "broker '%s' is not running (no %s)", c->server,
                     c->ipc_path);
        else if (errno == EACCES)
            r = fail(c, PKTIPC_EPERM, "%s: " DENIED, dir);
        else
            r = fail(c, PKTIPC_ESYS, "%s: %s", c->ipc_path, strerror(errno));
    } else if (!S_ISDIR(d.st_mode) || (d.st_mode & 022)) {
        r = fail(c, PKTIPC_EUNTRUSTED, "%s is not a runtime directory a broker makes (a "
                 "directory no other user can write): another user may be posing as broker "
                 "'%s'", dir, c->server);
    } else if (!S_ISSOCK(st.st_mode) || (st.st_uid != d.st_uid && st.st_uid)) {
        char theirs[64], its[64];
        if (!S_ISSOCK(st.st_mode))
            r = fail(c, PKTIPC_EUNTRUSTED, "%s is not a socket: another user may be posing as "
                     "broker '%s'", c->ipc_path, c->server);
        else
            r = fail(c, PKTIPC_EUNTRUSTED, "%s belongs to %s, its directory to %s: another "
                     "user may be posing as broker '%s'", c->ipc_path, who(st.st_uid, theirs),
                     who(d.st_uid, its), c->server);
    } else if (access(c->ipc_path, R_OK | W_OK)) {
        r = fail(c, PKTIPC_EPERM, "%s: " DENIED, c->ipc_path);
    } else {
        c->owner = st.st_uid;
    }
    free(dir);
    return r;
}

static int setup(pktipc_client *c, const struct pktipc_opts *o)
{
    if (!proto_name_ok(o->name))
        return fail(c, PKTIPC_EINVAL, "client name '%.64s': use 1-%d letters, digits, '_', '.' "
                    "or '-', starting with a letter or digit", o->name ? o->name : "(null)",
                    PROTO_NAME_MAX);
    strcpy(c->name, o->name);
    if (o->group && !proto_name_ok(o->group))
        return fail(c, PKTIPC_EINVAL, "group name '%.64s' is not a valid name", o->group);
    if (o->group)
        strcpy(c->group, o->group);
    if (!o->server || (!strstr(o->server, "://") && !proto_name_ok(o->server)))
        return fail(c, PKTIPC_EINVAL, "broker '%.64s': give a broker name or an endpoint",
                    o->server ? o->server : "(null)");
    if (o->policy != PKTIPC_POLICY_DROP && o->policy != PKTIPC_POLICY_BLOCK)
        return fail(c, PKTIPC_EINVAL, "policy must be PKTIPC_POLICY_DROP or _BLOCK");
    if (o->credit > PROTO_MAX_CREDIT)
        return fail(c, PKTIPC_EINVAL, "credit must be at most %d", PROTO_MAX_CREDIT);
    if (o->balance != PKTIPC_BALANCE_DEFAULT && o->balance != PKTIPC_BALANCE_FLOW &&
        o->balance != PKTIPC_BALANCE_ROUND_ROBIN)
        return fail(c, PKTIPC_EINVAL, "balance must be PKTIPC_BALANCE_DEFAULT, _FLOW or "
                    "_ROUND_ROBIN");
    c->balance_asked = o->balance == PKTIPC_BALANCE_FLOW ? PROTO_BALANCE_FLOW
                       : o->balance == PKTIPC_BALANCE_ROUND_ROBIN ? PROTO_BALANCE_ROUND_ROBIN
                       : NULL;
    c->policy = o->policy == PKTIPC_POLICY_BLOCK ? PROTO_POLICY_BLOCK : PROTO_POLICY_DROP;
    c->credit_asked = o->credit;
    c->reconnect = o->reconnect_ms < 0 ? DEFAULT_RECONNECT : o->reconnect_ms * NS_PER_MS;
    c->server = strdup(o->server);
    c->endpoint = endpoint_of(o->server);
    if (!c->endpoint && errno == EINVAL)
        return fail(c, PKTIPC_EINVAL, "no runtime directory: XDG_RUNTIME_DIR is not set; set "
                    "PKTIPC_RUNTIME_DIR to a directory of your own");
    if (!c->server || !c->endpoint)
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    if (!strncmp(c->endpoint, "ipc://", 6) && !(c->ipc_path = strdup(c->endpoint + 6)))
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    int r = check_socket(c);
    if (r)
        return r;
    c->epfd = epoll_create1(EPOLL_CLOEXEC);
    c->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    c->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (c->epfd < 0 || c->evfd < 0 || c->tfd < 0)
        return fail(c, PKTIPC_ESYS, "epoll, eventfd or timerfd: %s", strerror(errno));
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c->evfd};
    struct epoll_event tev = {.events = EPOLLIN, .data.fd = c->tfd};
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->evfd, &ev) ||
        epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->tfd, &tev))
        return fail(c, PKTIPC_ESYS, "epoll_ctl: %s", strerror(errno));
    c->zctx = zmq_ctx_new();
    if (!c->zctx)
        return fail(c, PKTIPC_ESYS, "zmq_ctx_new: %s", zmq_strerror(errno));
    if ((r = sock_open(c)) || (r = send_hello(c, now_ns())))
        return r;
    int timeout = o->timeout_ms;
    r = pump(c, now_ns() + (timeout < 0 ? DEFAULT_TIMEOUT : timeout * NS_PER_MS), WANT_WELCOME);
    if (r == 0)
        return fail(c, PKTIPC_ENOBROKER, "broker '%s' did not answer within %d ms", c->server,
                    timeout < 0 ? (int)(DEFAULT_TIMEOUT / NS_PER_MS) : timeout);
    return r < 0 ? r : 0;
}

static void destroy(pktipc_client *c)
{
    if (c->sock) {
        /* Waits a little for BYE to get out, never for anything else. */
        int bye = proto_bye(&c->conn, &c->out, now_ns()) == 0 && send_out(c) == 0;
        sock_close(c, bye ? LINGER_MS : 0);
    }
    if (c->zctx)
        while (zmq_ctx_term(c->zctx) < 0 && errno == EINTR)
            ;
    struct map *m = atomic_load(&c->maps);
    while (m) {
        struct map *next = m->next;
        map_free(m);
        m = next;
    }
    for (int *fd = &c->epfd; fd <= &c->tfd; fd++)
        if (*fd >= 0)
            close(*fd);
    proto_msg_free(&c->msg);
    msgpack_sbuffer_destroy(&c->out);
    free(c->pend);
    free(c->relq);
    free(c->server);
    free(c->endpoint);
    free(c->ipc_path);
    free(c);
}

API int pktipc_open(const struct pktipc_opts *opts, pktipc_client **out)
{
    if (out)
        *out = NULL;
    if (!opts || !out || opts->sz != sizeof(*opts))
        return -PKTIPC_EINVAL;
    pktipc_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -PKTIPC_ENOMEM;
    c->epfd = c->evfd = c->tfd = -1;
    c->phase = PH_OPENING;
    atomic_flag_clear(&c->busy);
    msgpack_sbuffer_init(&c->out);
    proto_msg_init(&c->msg);
    int r = setup(c, opts);
    if (r < 0) {
        if (opts->errbuf)
            snprintf(opts->errbuf, PKTIPC_ERRBUF_SIZE, "%s", c->err);
        destroy(c);
        return r;
    }
    c->err[0] = 0;
    *out = c;
    return 0;
}

API void pktipc_close(pktipc_client *c)
{
    if (c)
        destroy(c);
}

/* --- odds and ends ------------------------------------------------------------------ */

API const char *pktipc_geterr(const pktipc_client *c)
{
    return c ? c->err : "";
}

API const char *pktipc_strerror(int err)
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
    };
    unsigned e = err < 0 ? (unsigned)-(long)err : (unsigned)err;
    return e < sizeof(text) / sizeof(text[0]) ? text[e] : "unknown error";
}

/* The inverse of linktype_of() in pktipc/_broker/engine/ingest.c (libpcap's pcap-common.c):
 * LINKTYPE_* and DLT_* differ only for these historical values. */
API int pktipc_linktype_to_dlt(int linktype)
{
    switch (linktype) {
    case 100: return DLT_ATM_RFC1483;
    case 101: return DLT_RAW;
    case 102: return DLT_SLIP_BSDOS;
    case 103: return DLT_PPP_BSDOS;
    case 106: return DLT_ATM_CLIP;
    default: return linktype;
    }
}
