/*
 * libpktipc: the consuming thread's side (see OWNERSHIP in client.h): the
 * socket, the protocol state machine (proto.h) it drives, attaching and
 * attaching again to a broker that takes a lost one's place, mapping
 * segments, and handing batches out.
 */
#define _GNU_SOURCE
#include "client.h"

__attribute__((format(printf, 3, 4)))
int fail(pktipc_client *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    return -code;
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

void sock_close(pktipc_client *c, int linger)
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
int send_out(pktipc_client *c)
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
    tx_lost(c);         /* its area was this broker's to read */
    if (m)
        m->orphan = 1;
    c->held = 0;
    c->relq_len = 0;
}

/* From now on, every call returns r (a -PKTIPC_E* whose message is in c->err). */
static int stick(pktipc_client *c, int r)
{
    orphan(c);
    c->sticky = r;
    return r;
}

__attribute__((format(printf, 3, 4)))
int die(pktipc_client *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    return stick(c, -code);
}

/* The first attachment, waiting for its WELCOME (pktipc_open). */
static int opening(const pktipc_client *c)
{
    return c->conn.state == ST_HELLO_SENT && !c->conn.lost;
}

/* The machine has the broker lost (proto_lost, or its own finding): what
 * it handed out tells nobody any more, its connection is closed. */
static int gone(pktipc_client *c, const char *why)
{
    orphan(c);
    sock_close(c, 0);
    if (!proto_retrying(&c->conn))
        return die(c, PKTIPC_EGONE, "broker '%s' %s", c->server, why);
    c->lost_why = why;
    return 0;
}

/* An attempt to attach to a broker in a lost one's place came to nothing:
 * BYE if it was welcomed, its connection closed, the next one later. */
static void attempt_failed(pktipc_client *c, int64_t now)
{
    int bye = proto_failed(&c->conn, &c->out, now) && c->sock && send_out(c) == 0;
    sock_close(c, bye ? 100 : 0);
}

/* A broker broke the protocol: fatal, except while looking for a new broker,
 * where the next attempt may find a proper one. */
static int violation(pktipc_client *c, int64_t now, const char *why)
{
    if (proto_retrying(&c->conn)) {
        attempt_failed(c, now);
        return 0;
    }
    return die(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: %s", c->server, why);
}

static int send_hello(pktipc_client *c, int64_t now)
{
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

/* Room for `credit` batches pending or out at once. */
static int make_room(pktipc_client *c, uint32_t credit)
{
    if (credit <= c->pend_cap)
        return 0;
    struct pending *p = realloc(c->pend, credit * sizeof(*p));
    if (p)
        c->pend = p;
    uint64_t *q = p ? realloc(c->relq, credit * sizeof(*q)) : NULL;
    if (!q)
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    c->relq = q;
    c->pend_cap = credit;
    return 0;
}

/* Compiles opts.filter for the current broker's sources: 0 or -PKTIPC_E*. */
static int compile_filter(pktipc_client *c)
{
    if (!c->filter_expr)
        return 0;
    struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
    uint32_t n = m->hdr.iface_count;
    uint32_t *linktypes = malloc((n ? n : 1) * sizeof(*linktypes));
    if (!linktypes)
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++)
        linktypes[i] = pktipc_shm_iface(m->base, &m->hdr, i)->linktype;
    struct pktipc_filter *f;
    char err[PKTIPC_FILTER_ERRBUF_SIZE];
    int r = pktipc_filter_new(c->filter_expr, linktypes, n, &f, err);
    free(linktypes);
    if (r < 0)
        return fail(c, PKTIPC_EFILTER, "%s", err);
    pktipc_filter_free(c->filter);
    c->filter = f;
    return 0;
}

static int on_welcome(pktipc_client *c, int64_t now)
{
    const struct proto_msg *m = &c->msg;
    uint32_t len, glen, blen;
    const char *shm = proto_str(m, F_WELCOME_SHM, &len);
    const char *group = proto_str(m, F_WELCOME_GROUP, &glen);
    const char *balance = proto_str(m, F_WELCOME_BALANCE, &blen);
    uint32_t credit = (uint32_t)proto_u64(m, F_WELCOME_CREDIT);
    int retry = c->conn.lost;
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
    else if (!(r = make_room(c, credit))) {
        memcpy(name, shm, len);
        name[len] = 0;
        if (!(r = map_segment(c, name, proto_u64(m, F_WELCOME_EPOCH))))
            r = compile_filter(c);
    }
    if (r < 0) {
        attempt_failed(c, now);     /* BYE; on a first attachment, pktipc_open fails */
        /* Another broker will not take the filter either. */
        return !retry ? r : r == -PKTIPC_EFILTER ? stick(c, r) : 0;
    }
    c->credit = credit;
    c->pend_head = 0;
    c->balance = str_eq(balance, blen, PROTO_BALANCE_FLOW) ? PKTIPC_BALANCE_FLOW
                                                           : PKTIPC_BALANCE_ROUND_ROBIN;
    if (proto_mapped(&c->conn, &c->out, now) || send_out(c))
        return die(c, PKTIPC_ESYS, "cannot tell broker '%s' the segment is mapped: %s",
                   c->server, zmq_strerror(errno));
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
    /* Batches given back but not yet told (relq) are still held for the broker. */
    if (s->state != SLOT_FREE || c->held + c->relq_len >= c->credit) {
        snprintf(why, sizeof(why), "batch %llu: slab %llu is held already, or credit %u is "
                 "exceeded", (unsigned long long)seq, (unsigned long long)slab, c->credit);
        return violation(c, now, why);
    }
    struct pending pb = {.seq = seq, .slab = (uint32_t)slab, .n = (uint32_t)n};
    uint32_t members[PROTO_MAX_MEMBERS], nmembers = proto_slots(m, F_BATCH_MEMBERS, members);
    uint32_t masklen;
    const uint8_t *mask = proto_bin(m, F_BATCH_MASK, &masklen);
    if (map_share_area(map))
        return die(c, PKTIPC_ENOMEM, "out of memory");
    /* The descriptors are copied and checked now, while the slot is the
     * consuming thread's alone: the share, the filter and the user read
     * what was checked. The BATCH's fields go with the message. */
    const uint8_t *base = map->slabs + slab * map->slab_size;
    size_t at = (size_t)slab * map->pkts_cap;
    struct pktipc_pkt *copy = atomic_load_explicit(&map->share, memory_order_relaxed) + at;
    uint32_t *index = map->index + at;
    const uint32_t *in = NULL;
    memcpy(copy, pktipc_slab_pkts(base), (size_t)n * sizeof(*copy));
    uint32_t count = pktipc_pkts_check(&map->hdr, pb.slab, copy, pb.n);
    if (count < pb.n)
        return die(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: packet %u of batch %llu "
                   "lies outside its slab", c->server, count, (unsigned long long)seq);
    if (nmembers || mask) {
        count = pktipc_select(copy, pb.n, mask, members, nmembers, c->conn.slot, index);
        if (!count) {
            snprintf(why, sizeof(why), "batch %llu holds no packet of this client",
                     (unsigned long long)seq);
            return violation(c, now, why);
        }
        in = index;
    }
    if (c->filter) {
        uint32_t kept = pktipc_filter_run(c->filter, base, copy, in, count, index);
        c->filtered += count - kept;
        count = kept;
        in = index;
    }
    if (!count) {               /* nothing passed the filter: given back at once */
        c->relq[c->relq_len++] = seq;
        return 0;
    }
    if (count < pb.n) {         /* the copy keeps what is handed out; index[j] >= j */
        for (uint32_t j = 0; j < count; j++)
            copy[j] = copy[index[j]];
        pb.share = 1;
    }
    pb.count = count;
    s->state = SLOT_PENDING;
    c->pend[(c->pend_head + c->pend_len++) % c->pend_cap] = pb;
    c->held++;
    return 0;
}

static int on_error(pktipc_client *c)
{
    uint32_t clen, tlen;
    const char *code = proto_str(&c->msg, F_ERROR_CODE, &clen);
    const char *text = proto_str(&c->msg, F_ERROR_TEXT, &tlen);
    if (c->conn.state != ST_CLOSED)
        return fail(c, PKTIPC_EREFUSED, "broker '%s' refused a request: %.*s", c->server,
                    (int)tlen, text);
    /* It refused our HELLO: pktipc_open fails, a reattached client ends. */
    int e = str_eq(code, clen, "name-taken") ? PKTIPC_ENAMETAKEN
            : str_eq(code, clen, "balance-mismatch") ? PKTIPC_EBALANCE
            : str_eq(code, clen, "group-mismatch") ? PKTIPC_EGROUP
            : PKTIPC_EREFUSED;
    fail(c, e, "broker '%s' refused '%s': %.*s", c->server, c->name, (int)tlen, text);
    return c->conn.lost ? stick(c, -e) : -e;
}

static int on_frame(pktipc_client *c, const void *data, size_t len, int more, int64_t now)
{
    char why[PKTIPC_ERRBUF_SIZE];
    int rx = -1;
    if (more)
        return violation(c, now, "a message of several frames");
    if (proto_decode(&c->msg, data, len, why, sizeof(why)) ||
        (rx = proto_receive(&c->conn, &c->msg, now, why, sizeof(why))) < 0) {
        if (opening(c))
            return fail(c, PKTIPC_EPROTO, "%s is not a pktipc broker: %s", c->endpoint, why);
        return violation(c, now, why);
    }
    if (rx == PROTO_RX_ATTEMPT_FAILED) {
        sock_close(c, 0);
        return 0;
    }
    if (rx == PROTO_RX_LOST)
        return gone(c, "restarted and no longer knows this client");
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
        struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
        if (m && m->epoch != c->gap_epoch) {
            c->gap_epoch = m->epoch;        /* another broker: seqs anew */
            c->gap_end = 0;
        }
        if (from < c->gap_end)
            from = c->gap_end;
        if (to > from) {
            c->drops += to - from;
            c->gaps++;
            c->gap_end = to;
        }
        return 0;
    }
    case PMSG_EOS:
        c->ended = 1;
        text = proto_str(&c->msg, F_EOS_ERROR, &n);
        if (text)
            snprintf(c->eos_err, sizeof(c->eos_err), "stream ended early: %.*s", (int)n, text);
        return 0;
    case PMSG_ERROR:
        return on_error(c);
    case PMSG_TX_READY:
        return tx_on_ready(c);
    case PMSG_TX_DONE:
        return tx_on_done(c);
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
void take_released(pktipc_client *c)
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
        if (send_out(c)) {
            proto_lost(&c->conn, now);
            return gone(c, "does not take messages");
        }
        c->release_msgs++;
    }
    c->relq_len = 0;
    return 0;
}

static int check_socket(pktipc_client *c);

/* An attempt to attach to a broker in a lost one's place. */
static int attempt(pktipc_client *c, int64_t now)
{
    int r = check_socket(c);
    if (r == -PKTIPC_EUNTRUSTED)
        return stick(c, r);
    if (r || sock_open(c) || send_hello(c, now))
        attempt_failed(c, now);
    return 0;
}

static int timers(pktipc_client *c, int64_t now)
{
    if (c->sticky)
        return 0;
    switch (proto_handle_timer(&c->conn, &c->out, now)) {
    case PROTO_TIMER_SENT:
        if (send_out(c)) {
            proto_lost(&c->conn, now);
            return gone(c, "does not take messages");
        }
        return 0;
    case PROTO_TIMER_LOST:
        return gone(c, "stopped answering");
    case PROTO_TIMER_RETRY:
        return attempt(c, now);
    case PROTO_TIMER_ATTEMPT_FAILED:
        sock_close(c, 0);
        return 0;
    case PROTO_TIMER_GAVE_UP:
        return die(c, PKTIPC_EGONE, "broker '%s' %s, and none took its place within %lld ms",
                   c->server, c->lost_why, (long long)(c->conn.reconnect / NS_PER_MS));
    default:
        return 0;
    }
}

static int64_t next_timer(const pktipc_client *c)
{
    return c->sticky ? INT64_MAX : proto_timer(&c->conn);
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

/* Does what is due, and waits until `want` comes or `deadline` passes:
 * 1 when it came, 0 at the deadline, -PKTIPC_E*. */
int pump(pktipc_client *c, int64_t deadline, int want)
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
        if (want >= WANT_TX_READY && tx_wanted(c, want))
            return 1;
        if (want == WANT_WELCOME && (c->conn.state == ST_ATTACHED || c->conn.state == ST_ENDED))
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

/* Hands out the oldest pending batch: the checked copies of this client's
 * packets of the slab (its share, past its filter: chosen by on_batch),
 * their bytes in place. The release bitmap counts what was handed out, so
 * that the slab goes back once that is released. */
int hand_out(pktipc_client *c, struct pktipc_batch *b)
{
    struct pending pb = c->pend[c->pend_head];
    c->pend_head = (c->pend_head + 1) % c->pend_cap;
    c->pend_len--;
    struct map *m = atomic_load_explicit(&c->cur, memory_order_relaxed);
    struct slot *s = &m->slots[pb.slab];
    const uint8_t *slab = m->slabs + (size_t)pb.slab * m->slab_size;
    size_t at = (size_t)pb.slab * m->pkts_cap;
    const struct pktipc_pkt *copy = atomic_load_explicit(&m->share, memory_order_relaxed) + at;
    const uint32_t *index = pb.share ? m->index + at : NULL;
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

/* --- opening and closing ---------------------------------------------------------- */

/* As pktipc/_paths.py: runtime_dir() and control_endpoint(); NULL with
 * errno EINVAL when a user has no runtime directory. */
static char *endpoint_of(const char *server)
{
    char *out = NULL;
    if (strstr(server, "://"))
        return strdup(server);
    const char *dir = getenv(PROTO_RUNTIME_ENV);
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n;
    if (dir && *dir)
        n = asprintf(&out, "ipc://%s/%s" PROTO_CONTROL_SUFFIX, dir, server);
    else if (geteuid() == 0)
        n = asprintf(&out, "ipc://" PROTO_ROOT_RUNTIME_DIR "/%s" PROTO_CONTROL_SUFFIX, server);
    else if (xdg && *xdg)
        n = asprintf(&out, "ipc://%s/" PROTO_USER_RUNTIME_SUBDIR "/%s" PROTO_CONTROL_SUFFIX, xdg,
                     server);
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
    c->owner = c->owner_gid = -1;
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
        c->owner_gid = st.st_gid;
    }
    free(dir);
    return r;
}

int setup(pktipc_client *c, const struct pktipc_opts *o)
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
    if (o->filter && *o->filter && !(c->filter_expr = strdup(o->filter)))
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    c->credit_asked = o->credit;
    c->tx_frames = o->tx_frames;
    c->tx_frame_size = o->tx_frame_size;
    proto_conn_init(&c->conn, (o->reconnect_ms < 0 ? PROTO_DEFAULT_RECONNECT_MS
                                                   : o->reconnect_ms) * NS_PER_MS);
    c->server = strdup(o->server);
    c->endpoint = endpoint_of(o->server);
    if (!c->endpoint && errno == EINVAL)
        return fail(c, PKTIPC_EINVAL, "no runtime directory: XDG_RUNTIME_DIR is not set; set "
                    PROTO_RUNTIME_ENV " to a directory of your own");
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
    int timeout = o->timeout_ms < 0 ? PROTO_DEFAULT_TIMEOUT_MS : o->timeout_ms;
    r = pump(c, now_ns() + timeout * NS_PER_MS, WANT_WELCOME);
    if (r == 0)
        return fail(c, PKTIPC_ENOBROKER, "broker '%s' did not answer within %d ms", c->server,
                    timeout);
    return r < 0 ? r : 0;
}

void destroy(pktipc_client *c)
{
    if (c->sock) {
        /* Waits a little for BYE to get out, never for anything else. */
        int bye = proto_bye(&c->conn, &c->out, now_ns()) == 0 && send_out(c) == 0;
        sock_close(c, bye ? LINGER_MS : 0);
    }
    tx_lost(c);
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
    free(c->filter_expr);
    pktipc_filter_free(c->filter);
    free(c);
}
