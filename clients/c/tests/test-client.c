/*
 * The client against a fake broker (fakebroker.h: a real ROUTER socket and
 * a real segment) that the test drives step by step: batches, releases in
 * any order from other threads and how many RELEASE messages they make,
 * credit, the pollable descriptor, dispatch, a group member's share of a
 * batch (chosen as pktipc_select says, released, passed on), groups and
 * balance modes asked and refused, end of stream, eviction,
 * heartbeats, a broker lost and another taking its place, a broker that
 * breaks the protocol in every way the client checks, and bad use.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <pcap/pcap.h>

#include "fakebroker.h"

static char dir[64];
static int names;

static int64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *fresh_name(void)
{
    static char name[32];
    snprintf(name, sizeof(name), "b%d", ++names);
    return name;
}

struct opener {
    struct pktipc_opts o;
    char server[64], errbuf[PKTIPC_ERRBUF_SIZE];
    pktipc_client *c;
    int r;
    pthread_t t;
};

static void *open_thread(void *arg)
{
    struct opener *op = arg;
    op->r = pktipc_open(&op->o, &op->c);
    return NULL;
}

static void open_filtered(struct opener *op, const char *server, const char *name,
                          int reconnect_ms, const char *filter)
{
    memset(op, 0, sizeof(*op));
    snprintf(op->server, sizeof(op->server), "%s", server);
    op->o = (struct pktipc_opts){.sz = sizeof(op->o), .server = op->server, .name = name,
                                 .timeout_ms = 5000, .reconnect_ms = reconnect_ms,
                                 .errbuf = op->errbuf, .filter = filter};
    CHECK(pthread_create(&op->t, NULL, open_thread, op) == 0);
}

static void open_start(struct opener *op, const char *server, const char *name,
                       int reconnect_ms)
{
    open_filtered(op, server, name, reconnect_ms, NULL);
}

static int open_join(struct opener *op)
{
    pthread_join(op->t, NULL);
    return op->r;
}

/* A client attached to f: HELLO answered with WELCOME. */
static pktipc_client *attach(struct fb *f, const char *server, unsigned credit, unsigned hb_ms,
                             int reconnect_ms)
{
    struct opener op;
    open_start(&op, server, "c", reconnect_ms);
    CHECK(fb_expect(f, PMSG_HELLO, 5000));
    fb_welcome(f, credit, hb_ms, 30000);
    CHECK_EQ(open_join(&op), 0);
    /* Mapped: it says so at once, so that a broker ending keeps its segment. */
    CHECK_EQ(fb_recv(f, 1000), PMSG_HEARTBEAT);
    return op.c;
}

/* Has the consuming side run once (it sends what releases left to send). */
static void pump(pktipc_client *c)
{
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
}

/* The next RELEASE: its seqs, sorted, into seqs[]; their number. */
static int expect_release(struct fb *f, uint64_t *seqs, int timeout_ms)
{
    if (!fb_expect(f, PMSG_RELEASE, timeout_ms))
        return 0;
    const msgpack_object_array *a = &f->m.f[F_RELEASE_SEQS]->via.array;
    for (uint32_t i = 0; i < a->size; i++) {
        seqs[i] = a->ptr[i].via.u64;
        for (uint32_t j = i; j > 0 && seqs[j - 1] > seqs[j]; j--) {
            uint64_t t = seqs[j];
            seqs[j] = seqs[j - 1];
            seqs[j - 1] = t;
        }
    }
    return (int)a->size;
}

static void check_bytes(pktipc_client *c, const struct pktipc_batch *b)
{
    for (uint32_t i = 0; i < b->count; i++) {
        const uint8_t *d = pktipc_pkt_data(c, &b->pkts[i]);
        CHECK(d != NULL && d == pktipc_batch_data(b, &b->pkts[i]));
        CHECK_EQ(b->pkts[i].ts_ns, (int64_t)(b->seq + i));
        for (uint32_t j = 0; j < b->pkts[i].caplen; j++)
            CHECK_EQ(d[j], fb_byte(b->seq, i, j));
    }
}

/* --- bad use ------------------------------------------------------------------------ */

static void test_bad_options(void)
{
    pktipc_client *c = (pktipc_client *)&c;
    char errbuf[PKTIPC_ERRBUF_SIZE];
    struct pktipc_opts o = {.sz = sizeof(o), .server = "x", .name = "c", .errbuf = errbuf};
    CHECK_EQ(pktipc_open(NULL, &c), -PKTIPC_EINVAL);
    CHECK(c == NULL);
    CHECK_EQ(pktipc_open(&o, NULL), -PKTIPC_EINVAL);
    o.sz = offsetof(struct pktipc_opts, balance) - 1;     /* short of version 1's fields */
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    o.sz = 0;
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    o.sz = sizeof(o);
    static const char *const bad_names[] = {NULL, "", "-c", "c/d", "c d", "\xc3\xa9",
                                            "0123456789012345678901234567890123456789012345678"};
    for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
        o.name = bad_names[i];
        errbuf[0] = 0;
        CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
        CHECK(c == NULL && strstr(errbuf, "client name"));
    }
    o.name = "c";
    o.group = "a/b";
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    o.group = NULL;
    o.server = NULL;
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    o.server = "../etc";
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    o.server = "x";
    o.policy = 2;
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    o.policy = PKTIPC_POLICY_BLOCK;
    o.credit = 4097;
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    CHECK(strstr(errbuf, "credit"));
    o.credit = 0;
    o.balance = 3;
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
    CHECK(strstr(errbuf, "balance must be"));

    struct pktipc_batch b;
    struct pktipc_stats st;
    CHECK_EQ(pktipc_next_batch(NULL, &b, 0), -PKTIPC_EINVAL);
    CHECK_EQ(pktipc_release(NULL, NULL), -PKTIPC_EINVAL);
    CHECK_EQ(pktipc_release_batch(NULL, &b), -PKTIPC_EINVAL);
    CHECK_EQ(pktipc_dispatch(NULL, 0, NULL, NULL, 0), -PKTIPC_EINVAL);
    CHECK_EQ(pktipc_stats(NULL, &st, sizeof(struct pktipc_stats)), -PKTIPC_EINVAL);
    CHECK_EQ(pktipc_fd(NULL), -PKTIPC_EINVAL);
    CHECK(pktipc_pkt_data(NULL, NULL) == NULL);
    CHECK_EQ(pktipc_iface_count(NULL), 0);
    CHECK(*pktipc_geterr(NULL) == 0);
    pktipc_close(NULL);
}

static void test_no_broker(void)
{
    pktipc_client *c;
    char errbuf[PKTIPC_ERRBUF_SIZE];
    struct pktipc_opts o = {.sz = sizeof(o), .server = "nobody", .name = "c",
                            .timeout_ms = 200, .errbuf = errbuf};
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_ENOBROKER);
    CHECK(strstr(errbuf, "is not running") && strstr(errbuf, "nobody.ctl"));
    o.server = "tcp://127.0.0.1:1";             /* nobody listens: ZeroMQ retries quietly */
    int64_t t = ms_now();
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_ENOBROKER);
    CHECK(ms_now() - t >= 190 && strstr(errbuf, "did not answer within 200 ms"));
    o.server = "bogus://x";
    CHECK_EQ(pktipc_open(&o, &c), -PKTIPC_EINVAL);
}

static void test_refusals(void)
{
    struct fb f;
    struct opener op;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    open_start(&op, f.h->name, "dup", 0);
    CHECK(fb_expect(&f, PMSG_HELLO, 5000));
    uint32_t n;
    CHECK(memcmp(proto_str(&f.m, F_HELLO_NAME, &n), "dup", 3) == 0 && n == 3);
    CHECK(memcmp(proto_str(&f.m, F_HELLO_POLICY, &n), "drop", 4) == 0);
    CHECK(proto_str(&f.m, F_HELLO_GROUP, &n) == NULL);
    CHECK(f.m.f[F_HELLO_CREDIT] == NULL);
    CHECK_EQ(proto_u64(&f.m, F_HELLO_PID), getpid());
    fb_error(&f, "error", "name-taken", "a client named 'dup' is already attached (pid 1)");
    CHECK_EQ(open_join(&op), -PKTIPC_ENAMETAKEN);
    CHECK(op.c == NULL && strstr(op.errbuf, "already attached (pid 1)"));

    open_start(&op, f.h->name, "many", 0);
    CHECK(fb_expect(&f, PMSG_HELLO, 5000));
    fb_error(&f, "error", "too-many-clients", "this broker serves at most 1 clients");
    CHECK_EQ(open_join(&op), -PKTIPC_EREFUSED);
    CHECK(strstr(op.errbuf, "at most 1 clients"));

    /* Whatever answers must be a pktipc broker. */
    open_start(&op, f.h->name, "c", 0);
    CHECK(fb_expect(&f, PMSG_HELLO, 5000));
    fb_raw(&f, "HTTP/1.1 400", 12);
    CHECK_EQ(open_join(&op), -PKTIPC_EPROTO);
    CHECK(strstr(op.errbuf, "is not a pktipc broker"));

    struct { const char *what; int code; } cases[] = {
        {"layout", PKTIPC_ELAYOUT}, {"epoch", PKTIPC_ELAYOUT}, {"shm", PKTIPC_EGONE},
        {"no shm", PKTIPC_EPROTO},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        open_start(&op, f.h->name, "c", 0);
        CHECK(fb_expect(&f, PMSG_HELLO, 5000));
        fb_head(&f, "welcome", 10);
        fb_str(&f, "shm", !strcmp(cases[i].what, "shm") ? "/pktipc.gone.0"
                          : !strcmp(cases[i].what, "no shm") ? "" : f.shm);
        fb_u64(&f, "epoch", f.epoch + !strcmp(cases[i].what, "epoch"));
        fb_u64(&f, "layout", PKTIPC_LAYOUT_VERSION + !strcmp(cases[i].what, "layout"));
        fb_welcome_rest(&f, 1, 1000, 30000);
        fb_send(&f);
        CHECK_EQ(open_join(&op), -cases[i].code);
        CHECK(fb_expect(&f, PMSG_BYE, 5000));     /* it was attached: it says goodbye */
    }
    fb_free(&f);
}

/* HELLO asks for a group and a mode; the broker's refusals of them have
 * codes of their own; WELCOME must put the client where it asked. */
static void test_groups_and_modes(void)
{
    struct fb f;
    struct opener op;
    uint32_t n;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    static const struct {
        int balance;
        const char *wire;
    } modes[] = {{PKTIPC_BALANCE_DEFAULT, NULL}, {PKTIPC_BALANCE_FLOW, "flow"},
                 {PKTIPC_BALANCE_ROUND_ROBIN, "round-robin"}};
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        memset(&op, 0, sizeof(op));
        snprintf(op.server, sizeof(op.server), "%s", f.h->name);
        op.o = (struct pktipc_opts){.sz = sizeof(op.o), .server = op.server, .name = "w1",
                                    .group = i ? "ids" : NULL, .balance = modes[i].balance,
                                    .timeout_ms = 5000, .errbuf = op.errbuf};
        CHECK(pthread_create(&op.t, NULL, open_thread, &op) == 0);
        CHECK(fb_expect(&f, PMSG_HELLO, 5000));
        const char *g = proto_str(&f.m, F_HELLO_GROUP, &n);
        CHECK(i ? g && n == 3 && !memcmp(g, "ids", 3) : g == NULL);
        const char *b = proto_str(&f.m, F_HELLO_BALANCE, &n);
        CHECK(modes[i].wire ? b && n == strlen(modes[i].wire) && !memcmp(b, modes[i].wire, n)
                            : b == NULL);
        if (!modes[i].wire)
            snprintf(f.balance, sizeof(f.balance), "round-robin");  /* the group's mode */
        fb_welcome(&f, 2, 1000, 30000);
        CHECK_EQ(open_join(&op), 0);
        CHECK(strcmp(pktipc_group(op.c), i ? "ids" : "w1") == 0);
        CHECK_EQ(pktipc_balance(op.c), modes[i].wire ? modes[i].balance
                                                     : PKTIPC_BALANCE_ROUND_ROBIN);
        pktipc_close(op.c);
        CHECK(fb_expect(&f, PMSG_BYE, 5000));
    }
    CHECK(pktipc_group(NULL) == NULL);
    CHECK_EQ(pktipc_balance(NULL), -PKTIPC_EINVAL);

    struct { const char *code; int err; } refusals[] = {
        {"balance-mismatch", PKTIPC_EBALANCE}, {"group-mismatch", PKTIPC_EGROUP},
    };
    for (size_t i = 0; i < sizeof(refusals) / sizeof(refusals[0]); i++) {
        open_start(&op, f.h->name, "w2", 0);
        CHECK(fb_expect(&f, PMSG_HELLO, 5000));
        fb_error(&f, "error", refusals[i].code, "group 'ids' balances by flow, not round-robin");
        CHECK_EQ(open_join(&op), -refusals[i].err);
        CHECK(op.c == NULL && strstr(op.errbuf, "refused 'w2': group 'ids' balances by flow"));
        CHECK(strcmp(pktipc_strerror(-refusals[i].err), pktipc_strerror(-PKTIPC_EREFUSED)));
    }

    /* A WELCOME into another group, or in another mode than asked. */
    for (int wrong = 0; wrong < 2; wrong++) {
        memset(&op, 0, sizeof(op));
        snprintf(op.server, sizeof(op.server), "%s", f.h->name);
        op.o = (struct pktipc_opts){.sz = sizeof(op.o), .server = op.server, .name = "w3",
                                    .group = "ids", .balance = PKTIPC_BALANCE_FLOW,
                                    .timeout_ms = 5000, .errbuf = op.errbuf};
        CHECK(pthread_create(&op.t, NULL, open_thread, &op) == 0);
        CHECK(fb_expect(&f, PMSG_HELLO, 5000));
        snprintf(wrong ? f.balance : f.group, 16, wrong ? "round-robin" : "w3");
        fb_welcome(&f, 2, 1000, 30000);
        CHECK_EQ(open_join(&op), -PKTIPC_EPROTO);
        CHECK(strstr(op.errbuf, wrong ? "group 'ids', balanced by round-robin"
                                      : "welcomed 'w3' into group 'w3'"));
        CHECK(fb_expect(&f, PMSG_BYE, 5000));
    }
    fb_free(&f);
}

/* --- batches and releases ------------------------------------------------------------- */

struct releaser {
    pktipc_client *c;
    const struct pktipc_batch *b;
    int stride, first;
    pthread_t t;
};

static void *release_some(void *arg)
{
    struct releaser *r = arg;
    for (int i = (int)r->b->count - 1 - r->first; i >= 0; i -= r->stride)
        CHECK_EQ(pktipc_release(r->c, &r->b->pkts[i]), 0);
    return NULL;
}

static void test_batches_released_in_any_order(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 8, 65536);
    pktipc_client *c = attach(&f, f.h->name, 4, 1000, 0);
    CHECK_EQ(pktipc_iface_count(c), 1);
    CHECK(strcmp(pktipc_iface(c, 0)->name, "fake") == 0 && pktipc_iface(c, 1) == NULL);

    uint64_t s0 = fb_batch(&f, 2, 100, 60);
    uint64_t s1 = fb_batch(&f, 5, 1, 1500);
    uint64_t s2 = fb_batch(&f, 0, 300, 64);
    struct pktipc_batch b[3];
    CHECK_EQ(pktipc_next_batch(c, &b[0], 1000), 100);
    CHECK_EQ(pktipc_next_batch(c, &b[1], 1000), 1);
    CHECK_EQ(pktipc_next_batch(c, &b[2], 1000), 300);
    CHECK(b[0].seq == s0 && b[1].seq == s1 && b[2].seq == s2);
    for (int i = 0; i < 3; i++)
        check_bytes(c, &b[i]);
    struct pktipc_batch none;
    CHECK_EQ(pktipc_next_batch(c, &none, 0), 0);   /* nothing more */

    /* Batch 0 packet by packet from two threads, backwards and interleaved. */
    struct releaser r1 = {c, &b[0], 2, 0, 0}, r2 = {c, &b[0], 2, 1, 0};
    pthread_create(&r1.t, NULL, release_some, &r1);
    pthread_create(&r2.t, NULL, release_some, &r2);
    pthread_join(r1.t, NULL);
    pthread_join(r2.t, NULL);
    CHECK_EQ(pktipc_release(c, &b[0].pkts[7]), -PKTIPC_EALREADY);
    CHECK_EQ(pktipc_release_batch(c, &b[0]), -PKTIPC_EALREADY);
    pump(c);
    uint64_t seqs[8];
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == s0);

    /* Batch 2: a third of it one by one, then the rest at once. */
    for (uint32_t i = 0; i < b[2].count; i += 3)
        CHECK_EQ(pktipc_release(c, &b[2].pkts[i]), 0);
    CHECK_EQ(pktipc_release(c, &b[2].pkts[3]), -PKTIPC_EALREADY);
    pump(c);
    CHECK_EQ(fb_recv(&f, 100), -1);                /* nothing yet: the slab is not free */
    CHECK_EQ(pktipc_release_batch(c, &b[2]), 0);
    CHECK_EQ(pktipc_release_batch(c, &b[2]), -PKTIPC_EALREADY);
    CHECK_EQ(pktipc_release(c, &b[2].pkts[1]), -PKTIPC_EALREADY);
    pump(c);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == s2);

    /* Not packets of this client. */
    struct pktipc_pkt mine = b[1].pkts[0];
    CHECK_EQ(pktipc_release(c, &mine), -PKTIPC_EFOREIGN);
    CHECK(pktipc_pkt_data(c, &mine) == NULL);
    CHECK_EQ(pktipc_release(c, (const struct pktipc_pkt *)((const uint8_t *)b[1].pkts + 4)),
             -PKTIPC_EFOREIGN);
    const struct pktipc_pkt *slab7 = (const struct pktipc_pkt *)((const uint8_t *)b[1].pkts +
                                                                 2 * 65536);
    CHECK_EQ(pktipc_release(c, slab7), -PKTIPC_EFOREIGN);   /* a slab never given */
    CHECK_EQ(pktipc_release(c, &b[1].pkts[1]), -PKTIPC_EFOREIGN);   /* past the batch */
    struct pktipc_batch fake = b[1];
    fake.slot_ = &fake;
    CHECK_EQ(pktipc_release_batch(c, &fake), -PKTIPC_EFOREIGN);
    fake.slot_ = NULL;
    CHECK_EQ(pktipc_release_batch(c, &fake), -PKTIPC_EFOREIGN);

    /* Another client's packet. */
    struct fb f2;
    fb_init(&f2, dir, fresh_name(), 2, 65536);
    pktipc_client *c2 = attach(&f2, f2.h->name, 2, 1000, 0);
    fb_batch(&f2, 1, 3, 10);
    struct pktipc_batch other;
    CHECK_EQ(pktipc_next_batch(c2, &other, 1000), 3);
    CHECK_EQ(pktipc_release(c, &other.pkts[0]), -PKTIPC_EFOREIGN);
    CHECK_EQ(pktipc_release_batch(c, &other), -PKTIPC_EFOREIGN);
    CHECK(pktipc_pkt_data(c, &other.pkts[0]) == NULL);
    pktipc_close(c2);
    fb_free(&f2);

    struct pktipc_stats st;
    CHECK_EQ(pktipc_release_batch(c, &b[1]), 0);
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
    CHECK_EQ(st.packets, 401);
    CHECK_EQ(st.bytes, 100 * 60 + 1500 + 300 * 64);
    CHECK_EQ(st.batches, 3);
    CHECK_EQ(st.released, 3);
    CHECK_EQ(st.release_msgs, 3);
    CHECK_EQ(st.held, 0);
    CHECK(st.epoch == f.epoch);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    pktipc_close(c);
    CHECK(fb_expect(&f, PMSG_BYE, 2000));
    fb_free(&f);
}

/* However packets are released, one RELEASE carries every slab freed since
 * the consuming thread last ran. */
static void test_one_release_message_for_many_slabs(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 8, 65536);
    pktipc_client *c = attach(&f, f.h->name, 8, 1000, 0);
    struct pktipc_batch b[6];
    uint64_t want[6];
    static const uint32_t sizes[6] = {64, 128, 1, 63, 65, 200};   /* around bitmap words */
    for (int i = 0; i < 6; i++) {
        want[i] = fb_batch(&f, (uint32_t)i, sizes[i], 100);
        CHECK_EQ(pktipc_next_batch(c, &b[i], 1000), sizes[i]);
    }
    struct releaser r[6];
    for (int i = 0; i < 6; i++) {
        r[i] = (struct releaser){c, &b[i], 1, 0, 0};
        pthread_create(&r[i].t, NULL, release_some, &r[i]);
    }
    for (int i = 0; i < 6; i++)
        pthread_join(r[i].t, NULL);
    pump(c);
    uint64_t seqs[8];
    CHECK_EQ(expect_release(&f, seqs, 2000), 6);
    for (int i = 0; i < 6; i++)
        CHECK(seqs[i] == want[i]);
    CHECK_EQ(fb_recv(&f, 100), -1);
    pktipc_close(c);
    fb_free(&f);
}

struct waiter {
    pktipc_client *c;
    struct pktipc_batch b;
    int r, timeout_ms;
    pthread_t t;
};

static void *wait_batch(void *arg)
{
    struct waiter *w = arg;
    w->r = pktipc_next_batch(w->c, &w->b, w->timeout_ms);
    return NULL;
}

/* The consumer waits with its credit spent; a release on another thread
 * wakes it, it gives the slab back, and the broker's next batch comes. */
static void test_release_wakes_a_consumer_without_credit(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 2, 1000, 0);
    struct pktipc_batch b0, b1;
    uint64_t s0 = fb_batch(&f, 0, 10, 10);
    fb_batch(&f, 1, 10, 10);
    CHECK_EQ(pktipc_next_batch(c, &b0, 1000), 10);
    CHECK_EQ(pktipc_next_batch(c, &b1, 1000), 10);
    struct waiter w = {.c = c, .timeout_ms = -1};
    pthread_create(&w.t, NULL, wait_batch, &w);
    usleep(100000);
    struct pktipc_batch b;
    CHECK_EQ(pktipc_next_batch(c, &b, 0), -PKTIPC_EBUSY);      /* one consumer at a time */
    CHECK_EQ(pktipc_stats(c, &(struct pktipc_stats){0}, sizeof(struct pktipc_stats)), -PKTIPC_EBUSY);
    int64_t t = ms_now();
    CHECK_EQ(pktipc_release_batch(c, &b0), 0);
    uint64_t seqs[4];
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == s0 && ms_now() - t < 1000);
    uint64_t s2 = fb_batch(&f, 0, 5, 10);
    pthread_join(w.t, NULL);
    CHECK_EQ(w.r, 5);
    CHECK(w.b.seq == s2);
    check_bytes(c, &w.b);
    pktipc_close(c);
    fb_free(&f);
}

static int readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

static void *release_batch_thread(void *arg)
{
    struct releaser *r = arg;
    CHECK_EQ(pktipc_release_batch(r->c, (struct pktipc_batch *)r->b), 0);
    return NULL;
}

/* What an event loop does: wait for the descriptor, then call without
 * waiting, until a batch comes (a heartbeat due may wake it first). */
static int next_when_readable(pktipc_client *c, int fd, struct pktipc_batch *b)
{
    int64_t until = ms_now() + 2000;
    int r = 0;
    while (r == 0 && ms_now() < until)
        if (readable(fd, 2000))
            r = pktipc_next_batch(c, b, 0);
    return r;
}

static void test_pollable_descriptor(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 4, 200, 0);
    int fd = pktipc_fd(c);
    struct pktipc_batch b;
    CHECK(fd >= 0);
    CHECK_EQ(pktipc_next_batch(c, &b, 0), 0);
    CHECK(!readable(fd, 50));
    fb_batch(&f, 3, 4, 10);
    CHECK_EQ(next_when_readable(c, fd, &b), 4);
    CHECK_EQ(pktipc_next_batch(c, &b, 0), 0);
    CHECK(!readable(fd, 20));
    /* A release on another thread makes it readable; the call sends it. */
    struct pktipc_batch held;
    uint64_t s = fb_batch(&f, 1, 4, 10);
    CHECK_EQ(next_when_readable(c, fd, &held), 4);
    CHECK_EQ(pktipc_next_batch(c, &b, 0), 0);
    struct releaser r = {c, &held, 0, 0, 0};
    pthread_create(&r.t, NULL, release_batch_thread, &r);
    pthread_join(r.t, NULL);
    CHECK(readable(fd, 2000));
    CHECK_EQ(pktipc_next_batch(c, &b, 0), 0);
    uint64_t seqs[4];
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == s);
    /* A heartbeat due makes it readable too: a loop that polls it keeps
     * the client alive. */
    CHECK(!readable(fd, 0));
    CHECK(readable(fd, 1000));
    CHECK_EQ(pktipc_next_batch(c, &b, 0), 0);
    CHECK(fb_expect(&f, PMSG_HEARTBEAT, 1000));
    pktipc_close(c);
    fb_free(&f);
}

struct seen {
    pktipc_client *c;
    uint64_t seq;
    int calls;
};

static void on_packet(void *user, const struct pktipc_pkt *p, const uint8_t *data)
{
    struct seen *s = user;
    CHECK_EQ(p->ts_ns, (int64_t)(s->seq + (uint64_t)s->calls));
    CHECK(data == pktipc_pkt_data(s->c, p));
    for (uint32_t j = 0; j < p->caplen; j++)
        CHECK_EQ(data[j], fb_byte(s->seq, (uint32_t)s->calls, j));
    s->calls++;
}

static void test_dispatch(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 4, 1000, 0);
    struct seen s = {.c = c};
    CHECK_EQ(pktipc_dispatch(c, 0, on_packet, &s, 0), 0);
    s.seq = fb_batch(&f, 2, 10, 33);
    CHECK_EQ(pktipc_dispatch(c, 3, on_packet, &s, 1000), 3);
    CHECK_EQ(s.calls, 3);
    CHECK_EQ(fb_recv(&f, 50), -1);                 /* the batch is still at hand */
    CHECK_EQ(pktipc_dispatch(c, -1, on_packet, &s, 1000), 7);
    CHECK_EQ(s.calls, 10);
    pump(c);
    uint64_t seqs[4];
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == s.seq);
    pktipc_close(c);
    fb_free(&f);
}

/* --- a group member's share ------------------------------------------------------------ */

/* The indexes of slot me's packets of slab `slab` (n packets), by the
 * owner rule itself rather than pktipc_select's loop: their number. */
static uint32_t owned(struct fb *f, uint32_t slab, uint32_t n, const uint32_t *members,
                      uint32_t nmembers, const uint8_t *mask, uint32_t me, uint32_t *idx)
{
    const struct pktipc_pkt *d = fb_pkts(f, slab);
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if ((!mask || mask[i / 8] & 1 << i % 8) &&
            (!nmembers || members[pktipc_flow_owner(d[i].hash, members, nmembers)] == me))
            idx[k++] = i;
    uint32_t sel[512];
    CHECK_EQ(pktipc_select(d, n, mask, members, nmembers, me, sel), k);
    CHECK(memcmp(sel, idx, k * sizeof(*idx)) == 0);
    return k;
}

/* b holds exactly packets idx[0..k) of slab `slab`, as the broker wrote them. */
static void check_share(pktipc_client *c, struct fb *f, const struct pktipc_batch *b,
                        uint32_t slab, const uint32_t *idx, uint32_t k)
{
    const struct pktipc_pkt *d = fb_pkts(f, slab);
    CHECK_EQ(b->count, k);
    for (uint32_t i = 0; i < k; i++) {
        CHECK(memcmp(&b->pkts[i], &d[idx[i]], sizeof(*d)) == 0);
        CHECK(pktipc_batch_seq(b, i) == b->seq + idx[i]);
        const uint8_t *data = pktipc_pkt_data(c, &b->pkts[i]);
        CHECK(data != NULL && data == pktipc_batch_data(b, &b->pkts[i]));
        for (uint32_t j = 0; j < b->pkts[i].caplen; j++)
            CHECK_EQ(data[j], fb_byte(b->seq, idx[i], j));
    }
}

/* Shares by flow among members, by mask, by both, and a share that is the
 * whole slab: pkts[] holds exactly what pktipc_select says, in order. */
static void test_share_is_what_pktipc_select_says(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 8, 65536);
    f.slot = 7;
    pktipc_client *c = attach(&f, f.h->name, 8, 1000, 0);
    static const struct {
        uint32_t slab, n, nmembers, members[3];
        int masked;
    } cases[] = {
        {0, 300, 3, {3, 7, 11}, 0},     /* by flow */
        {1, 130, 0, {0}, 1},            /* a share passed on, several merged: by mask */
        {2, 200, 2, {7, 3}, 1},         /* a share passed on: both */
        {3, 64, 1, {7}, 0},             /* the only member: the whole slab */
    };
    uint64_t packets = 0, bytes = 0;
    for (size_t t = 0; t < sizeof(cases) / sizeof(cases[0]); t++) {
        uint32_t slab = cases[t].slab, n = cases[t].n, idx[512];
        uint64_t seq = fb_fill(&f, slab, n, 40 + (uint32_t)t);
        uint8_t mask[64] = {0};
        for (uint32_t i = 0; i < n; i++)
            if (i % 3 == 0 || i % 64 == 63)
                mask[i / 8] |= (uint8_t)(1 << i % 8);
        const uint8_t *m = cases[t].masked ? mask : NULL;
        uint32_t k = owned(&f, slab, n, cases[t].members, cases[t].nmembers, m, 7, idx);
        CHECK(k > 0 && (k < n) == (t < 3));
        fb_share_msg(&f, seq, slab, fb_gen(&f, slab), n, cases[t].members, cases[t].nmembers,
                     m, (n + 7) / 8);
        struct pktipc_batch b;
        CHECK_EQ(pktipc_next_batch(c, &b, 1000), k);
        CHECK(b.seq == seq);
        check_share(c, &f, &b, slab, idx, k);
        if (k == n)             /* the whole slab: copies of its descriptors, in order */
            CHECK(b.index == NULL && b.pkts != pktipc_slab_pkts(b.base) &&
                  memcmp(b.pkts, pktipc_slab_pkts(b.base), n * sizeof(*b.pkts)) == 0);
        else
            CHECK(b.index != NULL && memcmp(b.index, idx, k * sizeof(*idx)) == 0);
        packets += k;
        bytes += (uint64_t)k * (40 + t);
        CHECK_EQ(pktipc_release_batch(c, &b), 0);
        pump(c);
        uint64_t seqs[4];
        CHECK_EQ(expect_release(&f, seqs, 2000), 1);
        CHECK(seqs[0] == seq);
    }
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
    CHECK(st.packets == packets && st.bytes == bytes);
    CHECK_EQ(st.batches, 4);
    CHECK_EQ(st.released, 4);
    pktipc_close(c);
    fb_free(&f);
}

/* A filter keeps, of this member's share, the packets it matches, in one
 * batch as a share; a batch none of whose packets match is given back at
 * once and never handed out; what was left out is counted. libpcap's
 * refusal fails pktipc_open with its message. */
static void test_filter(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 8, 65536);
    f.slot = 7;
    struct opener op;
    /* Byte 0 is seq * 7 + i * 3: every other packet matches. */
    open_filtered(&op, f.h->name, "c", 0, "ether[0] & 1 = 0");
    CHECK(fb_expect(&f, PMSG_HELLO, 5000));
    fb_welcome(&f, 8, 1000, 30000);
    CHECK_EQ(open_join(&op), 0);
    CHECK_EQ(fb_recv(&f, 1000), PMSG_HEARTBEAT);
    pktipc_client *c = op.c;
    static const uint32_t members[] = {3, 7};
    uint32_t idx[512], kept[512];
    uint64_t filtered = 0;
    for (int shared = 0; shared < 2; shared++) {
        uint64_t seq = fb_fill(&f, (uint32_t)shared, 100, 60);
        uint32_t k = shared ? owned(&f, 1, 100, members, 2, NULL, 7, idx) : 100;
        for (uint32_t i = 0; i < k && !shared; i++)
            idx[i] = i;
        uint32_t m = 0;
        for (uint32_t i = 0; i < k; i++)
            if (fb_byte(seq, idx[i], 0) % 2 == 0)
                kept[m++] = idx[i];
        filtered += k - m;
        fb_share_msg(&f, seq, (uint32_t)shared, fb_gen(&f, (uint32_t)shared), 100, members,
                     shared ? 2 : 0, NULL, 0);
        struct pktipc_batch b;
        CHECK_EQ(pktipc_next_batch(c, &b, 1000), m);
        check_share(c, &f, &b, (uint32_t)shared, kept, m);
        CHECK(b.index != NULL);
        CHECK_EQ(pktipc_release_batch(c, &b), 0);
        pump(c);
        uint64_t seqs[4];
        CHECK_EQ(expect_release(&f, seqs, 2000), 1);
        CHECK(seqs[0] == seq);
    }
    /* A batch whose packets all start with an odd byte: given back unseen. */
    f.seq += f.seq % 2 ? 0 : 1;
    uint64_t seq = fb_fill(&f, 2, 1, 60);
    CHECK(fb_byte(seq, 0, 0) % 2 == 1);
    fb_share_msg(&f, seq, 2, fb_gen(&f, 2), 1, NULL, 0, NULL, 0);
    struct pktipc_batch b;
    CHECK_EQ(pktipc_next_batch(c, &b, 300), 0);
    uint64_t seqs[4];
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == seq);
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(st)), 0);
    CHECK(st.filtered == filtered + 1 && st.released == 2 && st.batches == 2);
    pktipc_close(c);
    CHECK(fb_expect(&f, PMSG_BYE, 2000));

    open_filtered(&op, f.h->name, "c", 0, "tcp port");
    CHECK(fb_expect(&f, PMSG_HELLO, 5000));
    fb_welcome(&f, 8, 1000, 30000);
    CHECK_EQ(open_join(&op), -PKTIPC_EFILTER);
    CHECK(op.c == NULL && strstr(op.errbuf, "filter 'tcp port': ") &&
          strstr(op.errbuf, "syntax error"));
    CHECK_EQ(fb_recv(&f, 1000), PMSG_BYE);
    fb_free(&f);
}

struct seen_share {
    uint64_t seq;
    const struct pktipc_pkt *d;     /* the fake broker's descriptors */
    const uint32_t *idx;
    uint32_t calls;
};

static void on_share_packet(void *user, const struct pktipc_pkt *p, const uint8_t *data)
{
    struct seen_share *s = user;
    uint32_t i = s->idx[s->calls++];
    CHECK(memcmp(p, &s->d[i], sizeof(*p)) == 0);
    for (uint32_t j = 0; j < p->caplen; j++)
        CHECK_EQ(data[j], fb_byte(s->seq, i, j));
}

/* A share goes back packet by packet from other threads, as a whole, or
 * through dispatch; each time the slab goes back in one RELEASE, once the
 * share is released. Its packets are known by the copies handed out. */
static void test_share_release(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 8, 65536);
    pktipc_client *c = attach(&f, f.h->name, 8, 1000, 0);
    const uint32_t members[] = {0, 5};
    uint32_t idx[512], k[3];
    uint64_t seq[3], seqs[4];
    struct pktipc_batch b[3];
    for (uint32_t t = 0; t < 3; t++) {
        seq[t] = fb_fill(&f, t, 200, 60);
        k[t] = owned(&f, t, 200, members, 2, NULL, 0, idx);
        CHECK(k[t] > 64 && k[t] < 200);
        fb_share_msg(&f, seq[t], t, fb_gen(&f, t), 200, members, 2, NULL, 0);
    }
    for (uint32_t t = 0; t < 2; t++)
        CHECK_EQ(pktipc_next_batch(c, &b[t], 1000), k[t]);

    /* Not packets of the share: the slab's own descriptors, past the share. */
    const struct pktipc_pkt *in_slab = pktipc_slab_pkts(b[0].base) + b[0].index[0];
    CHECK(memcmp(in_slab, &b[0].pkts[0], sizeof(*in_slab)) == 0);
    CHECK_EQ(pktipc_release(c, in_slab), -PKTIPC_EFOREIGN);
    CHECK_EQ(pktipc_release(c, &b[0].pkts[k[0]]), -PKTIPC_EFOREIGN);
    CHECK_EQ(pktipc_release(c, (const struct pktipc_pkt *)((const uint8_t *)b[0].pkts + 8)),
             -PKTIPC_EFOREIGN);

    /* Batch 0 from two threads, interleaved. */
    struct releaser r1 = {c, &b[0], 2, 0, 0}, r2 = {c, &b[0], 2, 1, 0};
    pthread_create(&r1.t, NULL, release_some, &r1);
    pthread_create(&r2.t, NULL, release_some, &r2);
    pthread_join(r1.t, NULL);
    pthread_join(r2.t, NULL);
    CHECK_EQ(pktipc_release(c, &b[0].pkts[k[0] - 1]), -PKTIPC_EALREADY);
    CHECK_EQ(pktipc_release_batch(c, &b[0]), -PKTIPC_EALREADY);
    pump(c);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == seq[0]);
    CHECK_EQ(fb_recv(&f, 100), -1);

    /* Batch 1: a few one by one, then the rest at once. */
    for (uint32_t i = 0; i < k[1]; i += 5)
        CHECK_EQ(pktipc_release(c, &b[1].pkts[i]), 0);
    pump(c);
    CHECK_EQ(fb_recv(&f, 100), -1);                /* not all of the share yet */
    CHECK_EQ(pktipc_release_batch(c, &b[1]), 0);
    pump(c);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == seq[1]);

    /* Batch 2 through dispatch. */
    owned(&f, 2, 200, members, 2, NULL, 0, idx);
    struct seen_share sh = {.seq = seq[2], .d = fb_pkts(&f, 2), .idx = idx};
    CHECK_EQ(pktipc_dispatch(c, 10, on_share_packet, &sh, 1000), 10);
    CHECK_EQ(fb_recv(&f, 50), -1);
    CHECK_EQ(pktipc_dispatch(c, -1, on_share_packet, &sh, 1000), k[2] - 10);
    CHECK_EQ(sh.calls, k[2]);
    pump(c);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == seq[2]);
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
    CHECK_EQ(st.held, 0);
    CHECK_EQ(st.packets, k[0] + k[1] + k[2]);
    CHECK_EQ(st.release_msgs, 3);
    pktipc_close(c);
    fb_free(&f);
}

/* A member left holding its share of a batch this member had and gave
 * back: the broker sends the batch again, with the leaver's packets that
 * are now this member's. */
static void test_passed_on_share_comes_again(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 2, 1000, 0);
    const uint32_t both[] = {0, 1}, now[] = {0};
    uint32_t mine[256], theirs[256];
    uint64_t seq = fb_fill(&f, 3, 150, 30), seqs[4];
    uint32_t k = owned(&f, 3, 150, both, 2, NULL, 0, mine);
    uint32_t left = owned(&f, 3, 150, both, 2, NULL, 1, theirs);
    CHECK(k + left == 150 && k && left);
    fb_share_msg(&f, seq, 3, fb_gen(&f, 3), 150, both, 2, NULL, 0);
    struct pktipc_batch b, again;
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), k);
    check_share(c, &f, &b, 3, mine, k);
    CHECK_EQ(pktipc_release_batch(c, &b), 0);
    pump(c);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == seq);

    uint8_t mask[19] = {0};
    for (uint32_t i = 0; i < left; i++)
        mask[theirs[i] / 8] |= (uint8_t)(1 << theirs[i] % 8);
    fb_share_msg(&f, seq, 3, fb_gen(&f, 3), 150, now, 1, mask, sizeof(mask));
    CHECK_EQ(pktipc_next_batch(c, &again, 1000), left);
    CHECK(again.seq == seq);
    check_share(c, &f, &again, 3, theirs, left);
    CHECK_EQ(pktipc_release_batch(c, &b), -PKTIPC_EALREADY);     /* the first hand-out */
    for (uint32_t i = 0; i < left; i++)
        CHECK_EQ(pktipc_release(c, &again.pkts[left - 1 - i]), 0);
    CHECK_EQ(pktipc_release(c, &again.pkts[0]), -PKTIPC_EALREADY);
    pump(c);
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    CHECK(seqs[0] == seq);
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
    CHECK_EQ(st.packets, 150);
    CHECK_EQ(st.batches, 2);
    CHECK_EQ(st.released, 2);
    CHECK_EQ(st.held, 0);
    pktipc_close(c);
    fb_free(&f);
}

/* --- the end of a client's stream ------------------------------------------------------ */

static void test_gaps_and_end_of_stream(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 4, 1000, 0);
    f.seq = 1000;
    fb_head(&f, "gap", 2);
    fb_u64(&f, "from", 990);
    fb_u64(&f, "to", 1000);
    fb_send(&f);
    fb_head(&f, "gap", 2);          /* told again (a resumed place): counted once */
    fb_u64(&f, "from", 990);
    fb_u64(&f, "to", 1000);
    fb_send(&f);
    fb_head(&f, "gap", 2);          /* partly told already */
    fb_u64(&f, "from", 995);
    fb_u64(&f, "to", 1000);
    fb_send(&f);
    fb_batch(&f, 0, 5, 10);
    fb_head(&f, "eos", 1);
    fb_str(&f, "error", "file.pcap: truncated");
    fb_send(&f);
    struct pktipc_batch b;
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), 5);   /* what came before the end first */
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), -PKTIPC_EEOS);
    CHECK(strcmp(pktipc_geterr(c), "stream ended early: file.pcap: truncated") == 0);
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), -PKTIPC_EEOS);
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
    CHECK_EQ(st.drops, 10);
    CHECK_EQ(st.gaps, 1);
    CHECK_EQ(st.held, 1);
    CHECK_EQ(pktipc_release(c, &b.pkts[4]), 0);    /* releases still go to the broker */
    CHECK_EQ(pktipc_release_batch(c, &b), 0);
    pump(c);
    uint64_t seqs[4];
    CHECK_EQ(expect_release(&f, seqs, 2000), 1);
    pktipc_close(c);
    CHECK(fb_expect(&f, PMSG_BYE, 2000));

    c = attach(&f, f.h->name, 4, 1000, 0);         /* the end with no error */
    fb_head(&f, "eos", 1);
    fb_key(&f, "error");
    msgpack_pack_nil(&f.pk);
    fb_send(&f);
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), -PKTIPC_EEOS);
    CHECK(*pktipc_geterr(c) == 0);
    pktipc_close(c);
    fb_free(&f);
}

static void *evict_later(void *arg)
{
    usleep(150000);
    fb_error(arg, "evict", "timeout", "nothing heard for 30 s");
    return NULL;
}

static void test_evicted(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 4, 1000, 30000);
    struct pktipc_batch b, b2;
    fb_batch(&f, 0, 5, 10);
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), 5);
    fb_batch(&f, 1, 5, 10);                        /* announced, then voided by the eviction */
    fb_error(&f, "evict", "lease", "it held a batch for more than 30 s");
    usleep(300000);                                /* both are in when it looks */
    CHECK_EQ(pktipc_next_batch(c, &b2, 1000), -PKTIPC_EEVICTED);
    CHECK(strstr(pktipc_geterr(c), "evicted 'c': it held a batch for more than 30 s"));
    CHECK_EQ(pktipc_next_batch(c, &b2, 0), -PKTIPC_EEVICTED);   /* and it stays so */
    CHECK_EQ(pktipc_release_batch(c, &b), 0);      /* nobody to tell, no message */
    pump(c);
    CHECK_EQ(fb_recv(&f, 100), -1);
    pktipc_close(c);
    CHECK_EQ(fb_recv(&f, 100), -1);                /* no BYE either */

    /* Evicted while silent: the broker reused the slab of a batch still on
     * its way; that batch no longer matches, and the eviction is the news. */
    c = attach(&f, f.h->name, 4, 1000, 30000);
    fb_batch(&f, 2, 5, 10);
    fb_batch(&f, 3, 5, 10);
    fb_fill(&f, 3, 7, 10);
    fb_error(&f, "evict", "timeout", "nothing heard for 30 s");
    usleep(300000);
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), -PKTIPC_EEVICTED);
    CHECK(strstr(pktipc_geterr(c), "evicted 'c': nothing heard for 30 s"));
    pktipc_close(c);

    /* The same, the EVICT still on its way when the batch is found not to
     * match: it is waited for, a little, rather than taken for a broken
     * protocol. */
    c = attach(&f, f.h->name, 4, 1000, 30000);
    fb_batch(&f, 2, 5, 10);
    fb_fill(&f, 2, 7, 10);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, evict_later, &f) == 0);
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), -PKTIPC_EEVICTED);
    pthread_join(t, NULL);
    CHECK(strstr(pktipc_geterr(c), "evicted 'c': nothing heard for 30 s"));
    pktipc_close(c);
    fb_free(&f);
}

/* --- a broker that breaks the protocol ------------------------------------------------ */

/* A header whose geometry cannot be (offsets wrapping around 2^64, counts
 * beyond the mapping): refused when attaching, nothing read through it. */
static void test_impossible_headers(void)
{
    static const char *cases[] = {"slabs-off-wraps", "batch-table-wraps", "slab-count",
                                  "iface-count", "slab-size-odd", "total-beyond"};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct fb f;
        fb_init(&f, dir, fresh_name(), 4, 65536);
        struct pktipc_header *h = f.h;
        if (!strcmp(cases[i], "slabs-off-wraps"))
            h->slabs_off = UINT64_MAX - 4095;
        else if (!strcmp(cases[i], "batch-table-wraps"))
            h->batch_table_off = UINT64_MAX - 63;
        else if (!strcmp(cases[i], "slab-count"))
            h->slab_count = UINT32_MAX;
        else if (!strcmp(cases[i], "iface-count"))
            h->iface_count = UINT32_MAX;
        else if (!strcmp(cases[i], "slab-size-odd"))
            h->slab_size = 65537;
        else
            h->total_size = f.size + 4096;
        struct opener op;
        open_start(&op, f.h->name, "c", 0);
        CHECK(fb_expect(&f, PMSG_HELLO, 5000));
        fb_welcome(&f, 2, 1000, 30000);
        CHECK_EQ(open_join(&op), -PKTIPC_ELAYOUT);
        char want[64];
        snprintf(want, sizeof(want), "is not a layout %d segment", PKTIPC_LAYOUT_VERSION);
        CHECK(strstr(op.errbuf, want));
        fb_free(&f);
    }
}

/* Descriptors the broker changes after they were handed out: the user's
 * are copies, as they were checked. */
static void test_descriptors_are_copies(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 2, 1000, 30000);
    fb_batch(&f, 1, 3, 10);
    struct pktipc_batch b;
    CHECK_EQ(pktipc_next_batch(c, &b, 1000), 3);
    struct pktipc_pkt *live = (struct pktipc_pkt *)(f.seg + f.h->slabs_off + 65536);
    uint32_t off = b.pkts[1].data_off;
    live[1].data_off = UINT32_MAX;
    live[1].caplen = UINT32_MAX;
    CHECK(b.pkts[1].data_off == off && b.pkts[1].caplen == 10);
    CHECK(pktipc_pkt_data(c, &b.pkts[1]) == b.base + off);
    CHECK_EQ(pktipc_release_batch(c, &b), 0);
    pktipc_close(c);
    fb_free(&f);
}

static void test_protocol_violations(void)
{
    static const struct {
        const char *k, *why;
    } cases[] = {
        {"slab-range", "names slab 4 of 4"},
        {"generation", "does not match the segment"},
        {"count", "does not match the segment"},
        {"descriptor", "packet 2 of batch 0 lies outside its slab"},
        {"descriptor-wraps", "packet 1 of batch 0 lies outside its slab"},
        {"descriptor-over-descriptors", "packet 0 of batch 0 lies outside its slab"},
        {"count-beyond-slab", "does not match the segment"},
        {"held-slab", "slab 1 is held already"},
        {"credit", "credit 2 is exceeded"},
        {"welcome-again", "unexpected: welcome while attached"},
        {"garbage", "malformed"},
        {"multipart", "several frames"},
        {"gap-backwards", "a gap that ends before it starts"},
        {"batch-in-the-future", "does not match the segment"},
        {"not-a-member", "bad-field: batch: slot 0 not among members"},
        {"members-repeat", "bad-field: batch.members"},
        {"member-beyond-u32", "bad-field: batch.members"},
        {"too-many-members", "bad-field: batch.members"},
        {"members-not-a-list", "bad-field: batch.members"},
        {"mask-short", "bad-field: batch: fields disagree"},
        {"mask-long", "bad-field: batch: fields disagree"},
        {"mask-bit-past-n", "bad-field: batch: fields disagree"},
        {"mask-a-string", "bad-field: batch.mask"},
        {"empty-share", "batch 0 holds no packet of this client"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *k = cases[i].k;
        struct fb f;
        fb_init(&f, dir, fresh_name(), 4, 65536);
        pktipc_client *c = attach(&f, f.h->name, 2, 1000, 30000);
        struct pktipc_batch b;
        if (!strcmp(k, "slab-range")) {
            fb_batch_msg(&f, 0, 4, 1, 1);
        } else if (!strcmp(k, "generation")) {
            uint64_t s = fb_fill(&f, 1, 3, 10);
            fb_batch_msg(&f, s, 1, 2, 3);
        } else if (!strcmp(k, "count")) {
            uint64_t s = fb_fill(&f, 1, 3, 10);
            fb_batch_msg(&f, s, 1, 1, 4);
        } else if (!strcmp(k, "batch-in-the-future")) {
            uint64_t s = fb_fill(&f, 1, 3, 10);
            fb_batch_msg(&f, s + 3, 1, 1, 3);
        } else if (!strcmp(k, "descriptor")) {
            fb_fill(&f, 1, 3, 10);
            struct pktipc_pkt *d = (struct pktipc_pkt *)(f.seg + f.h->slabs_off + 65536);
            d[2].caplen = 65536;
            fb_batch_msg(&f, 0, 1, 1, 3);
        } else if (!strcmp(k, "descriptor-wraps")) {
            fb_fill(&f, 1, 3, 10);
            struct pktipc_pkt *d = (struct pktipc_pkt *)(f.seg + f.h->slabs_off + 65536);
            d[1].data_off = UINT32_MAX - 7;     /* + caplen wraps around 2^32 */
            fb_batch_msg(&f, 0, 1, 1, 3);
        } else if (!strcmp(k, "descriptor-over-descriptors")) {
            fb_fill(&f, 1, 3, 10);
            struct pktipc_pkt *d = (struct pktipc_pkt *)(f.seg + f.h->slabs_off + 65536);
            d[0].data_off = 32;                 /* the second descriptor's place */
            fb_batch_msg(&f, 0, 1, 1, 3);
        } else if (!strcmp(k, "count-beyond-slab")) {
            fb_fill(&f, 1, 3, 10);
            struct pktipc_batch_rec *r =
                (struct pktipc_batch_rec *)(f.seg + f.h->batch_table_off) + 1;
            r->count = 65536 / PKTIPC_DESC_SIZE + 1;
            fb_batch_msg(&f, 0, 1, 1, r->count);
        } else if (!strcmp(k, "held-slab")) {
            uint64_t s = fb_batch(&f, 1, 3, 10);
            fb_batch_msg(&f, s, 1, 1, 3);
        } else if (!strcmp(k, "credit")) {
            fb_batch(&f, 0, 3, 10);
            fb_batch(&f, 1, 3, 10);
            fb_batch(&f, 2, 3, 10);
        } else if (!strcmp(k, "welcome-again")) {
            fb_welcome(&f, 2, 1000, 30000);
        } else if (!strcmp(k, "garbage")) {
            fb_raw(&f, "\x82\xa1t", 3);
        } else if (!strcmp(k, "multipart")) {
            CHECK(zmq_send(f.sock, f.peer, f.peer_len, ZMQ_SNDMORE) >= 0);
            CHECK(zmq_send(f.sock, "a", 1, ZMQ_SNDMORE) >= 0);
            CHECK(zmq_send(f.sock, "b", 1, 0) >= 0);
        } else if (!strcmp(k, "not-a-member")) {
            fb_fill(&f, 1, 3, 10);
            fb_share_msg(&f, 0, 1, 1, 3, (const uint32_t[]){1, 2}, 2, NULL, 0);
        } else if (!strcmp(k, "members-repeat")) {
            fb_fill(&f, 1, 3, 10);
            fb_share_msg(&f, 0, 1, 1, 3, (const uint32_t[]){0, 2, 0}, 3, NULL, 0);
        } else if (!strcmp(k, "too-many-members")) {
            static uint32_t many[PROTO_MAX_MEMBERS + 1];
            for (uint32_t m = 0; m <= PROTO_MAX_MEMBERS; m++)
                many[m] = m;
            fb_fill(&f, 1, 3, 10);
            fb_share_msg(&f, 0, 1, 1, 3, many, PROTO_MAX_MEMBERS + 1, NULL, 0);
        } else if (!strcmp(k, "mask-short")) {
            fb_fill(&f, 1, 9, 10);
            fb_share_msg(&f, 0, 1, 1, 9, NULL, 0, "\xff", 1);
        } else if (!strcmp(k, "mask-long")) {
            fb_fill(&f, 1, 8, 10);
            fb_share_msg(&f, 0, 1, 1, 8, NULL, 0, "\xff\x00", 2);
        } else if (!strcmp(k, "mask-bit-past-n")) {
            fb_fill(&f, 1, 3, 10);
            fb_share_msg(&f, 0, 1, 1, 3, NULL, 0, "\x0f", 1);
        } else if (!strcmp(k, "empty-share")) {
            fb_fill(&f, 1, 3, 10);          /* the broker sends no BATCH without a packet */
            fb_share_msg(&f, 0, 1, 1, 3, NULL, 0, "\x00", 1);
        } else if (!strcmp(k, "member-beyond-u32") || !strcmp(k, "members-not-a-list") ||
                   !strcmp(k, "mask-a-string")) {
            fb_fill(&f, 1, 3, 10);
            fb_head(&f, "batch", 6);
            fb_u64(&f, "seq", 0);
            fb_u64(&f, "slab", 1);
            fb_u64(&f, "gen", 1);
            fb_u64(&f, "n", 3);
            fb_key(&f, "members");
            if (!strcmp(k, "members-not-a-list")) {
                msgpack_pack_uint32(&f.pk, 0);
            } else {
                msgpack_pack_array(&f.pk, 2);
                msgpack_pack_uint64(&f.pk, 0);
                msgpack_pack_uint64(&f.pk, !strcmp(k, "mask-a-string") ? 1 : UINT64_C(1) << 32);
            }
            fb_key(&f, "mask");
            if (!strcmp(k, "mask-a-string"))
                fb_key(&f, "\x07");
            else
                msgpack_pack_nil(&f.pk);
            fb_send(&f);
        } else if (!strcmp(k, "gap-backwards")) {
            fb_head(&f, "gap", 2);
            fb_u64(&f, "from", 10);
            fb_u64(&f, "to", 9);
            fb_send(&f);
        }
        int r;
        while ((r = pktipc_next_batch(c, &b, 1000)) > 0)
            ;
        if (r != -PKTIPC_EPROTO) {
            fprintf(stderr, "case %s: %d\n", k, r);
            CHECK_EQ(r, -PKTIPC_EPROTO);
        }
        if (!strstr(pktipc_geterr(c), "broke the protocol: ") ||
            !strstr(pktipc_geterr(c), cases[i].why)) {
            fprintf(stderr, "case %s: %s\n", k, pktipc_geterr(c));
            CHECK(!"the reason given");
        }
        CHECK_EQ(pktipc_next_batch(c, &b, 0), -PKTIPC_EPROTO);
        pktipc_close(c);
        fb_free(&f);
    }
}

/* --- liveness and reconnection ---------------------------------------------------------- */

static void test_heartbeats_and_a_silent_broker(void)
{
    struct fb f;
    fb_init(&f, dir, fresh_name(), 4, 65536);
    pktipc_client *c = attach(&f, f.h->name, 4, 200, 0);
    struct pktipc_batch b;
    /* The client sends heartbeats while it waits; the broker answers the
     * first three, then says nothing: after 5 of its intervals it is lost,
     * and with no reconnection allowed that is the end. (Answering keeps
     * the test true however late a loaded machine runs the client.) */
    int beats = 0, r = 0;
    int64_t silent = 0, until = ms_now() + 10000;
    while (r != -PKTIPC_EGONE && ms_now() < until) {
        r = pktipc_next_batch(c, &b, 50);
        CHECK(r == 0 || r == -PKTIPC_EGONE);
        while (fb_recv(&f, 0) == PMSG_HEARTBEAT)
            if (++beats <= 3) {
                fb_head(&f, "heartbeat", 0);
                fb_send(&f);
                silent = ms_now();
            }
    }
    CHECK_EQ(r, -PKTIPC_EGONE);
    CHECK(beats >= 3 && ms_now() - silent >= 990);
    CHECK(strstr(pktipc_geterr(c), "stopped answering"));
    pktipc_close(c);
    fb_free(&f);
}

static void test_reconnects_to_the_broker_that_takes_over(void)
{
    struct fb f1, f2;
    const char *name = fresh_name();
    fb_init(&f1, dir, name, 4, 65536);
    pktipc_client *c = attach(&f1, name, 4, 100, 5000);
    uint64_t s = fb_batch(&f1, 1, 20, 100);
    struct pktipc_batch old, b;
    CHECK_EQ(pktipc_next_batch(c, &old, 1000), 20);
    fb_close_socket(&f1);                          /* the broker dies; its segment stays */
    shm_unlink(f1.shm);                            /* as the next broker cleans up */

    fb_init(&f2, dir, name, 8, 1 << 20);           /* another geometry, another epoch */
    int sent_error = 0;
    struct waiter w = {.c = c, .timeout_ms = 5000};
    pthread_create(&w.t, NULL, wait_batch, &w);
    /* Its heartbeats reach the new broker, which does not know it. */
    for (int64_t t = ms_now(); ms_now() - t < 4000;) {
        int type = fb_recv(&f2, 100);
        if (type == PMSG_HEARTBEAT && !sent_error) {
            fb_error(&f2, "error", "not-attached", "heartbeat not allowed from a new peer");
            sent_error = 1;
        } else if (type == PMSG_HELLO) {
            fb_welcome(&f2, 4, 100, 30000);
            break;
        }
    }
    uint64_t s2 = fb_batch(&f2, 7, 3, 1000);
    pthread_join(w.t, NULL);
    if (w.r != 3)
        fprintf(stderr, "%s\n", pktipc_geterr(c));
    CHECK_EQ(w.r, 3);
    CHECK(w.b.seq == s2);
    check_bytes(c, &w.b);
    check_bytes(c, &old);                          /* the old broker's batch, still readable */
    CHECK_EQ(pktipc_release_batch(c, &old), 0);    /* given back to nobody */
    CHECK_EQ(pktipc_release_batch(c, &w.b), 0);
    pump(c);
    uint64_t seqs[4];
    CHECK_EQ(expect_release(&f2, seqs, 2000), 1);
    CHECK(seqs[0] == s2);
    CHECK(s == 0 && s2 == 0);                      /* sequence numbers start again */
    struct pktipc_stats st;
    CHECK_EQ(pktipc_stats(c, &st, sizeof(struct pktipc_stats)), 0);
    CHECK_EQ(st.reconnects, 1);
    CHECK(st.epoch == f2.epoch);
    CHECK_EQ(st.held, 0);
    CHECK_EQ(pktipc_next_batch(c, &b, 0), 0);
    pktipc_close(c);
    fb_free(&f1);
    fb_free(&f2);
}

static void test_gives_up_when_no_broker_comes(void)
{
    struct fb f;
    const char *name = fresh_name();
    int64_t t = ms_now();
    fb_init(&f, dir, name, 4, 65536);
    pktipc_client *c = attach(&f, name, 4, 50, 600);
    fb_close_socket(&f);
    struct pktipc_batch b;
    int r;
    while ((r = pktipc_next_batch(c, &b, 100)) == 0)
        ;
    CHECK_EQ(r, -PKTIPC_EGONE);
    CHECK(ms_now() - t >= 850 && ms_now() - t < 5000);     /* 250 ms to notice, 600 to retry */
    CHECK(strstr(pktipc_geterr(c), "none took its place within 600 ms"));
    pktipc_close(c);
    fb_free(&f);
}

/* --- odds and ends -------------------------------------------------------------------- */

static void test_strerror(void)
{
    for (int e = 1; e <= PKTIPC_EFILTER; e++) {
        CHECK(strcmp(pktipc_strerror(-e), "unknown error") != 0);
        CHECK(pktipc_strerror(-e) == pktipc_strerror(e));
    }
    CHECK(strcmp(pktipc_strerror(-PKTIPC_EFILTER - 1), "unknown error") == 0);
    CHECK(strcmp(pktipc_strerror(-1000000), "unknown error") == 0);
    CHECK(strcmp(pktipc_strerror(0), "success") == 0);
}

/* pktipc_linktype_to_dlt agrees with libpcap reading a file of each link type. */
static void test_linktypes_as_libpcap_reads_them(void)
{
    int checked = 0;
    for (uint32_t lt = 0; lt < 300; lt++) {
        struct {
            uint32_t magic;
            uint16_t major, minor;
            int32_t zone;
            uint32_t sigfigs, snaplen, linktype;
        } h = {0xa1b23c4d, 2, 4, 0, 0, 65535, lt};
        FILE *fp = fmemopen(&h, sizeof(h), "rb");
        char err[PCAP_ERRBUF_SIZE];
        pcap_t *p = pcap_fopen_offline_with_tstamp_precision(fp, PCAP_TSTAMP_PRECISION_NANO, err);
        if (!p) {
            fclose(fp);
            continue;
        }
        CHECK_EQ(pktipc_linktype_to_dlt((int)lt), pcap_datalink(p));
        pcap_close(p);
        checked++;
    }
    CHECK(checked > 100);
}

static int open_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* The runtime directory and what a failed test left in it. */
static void remove_dir(void)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') {
            char path[sizeof(dir) + 256];
            snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
            unlink(path);
        }
    if (d)
        closedir(d);
    rmdir(dir);
}

int main(int argc, char **argv)
{
    int fds = open_fds();
    snprintf(dir, sizeof(dir), "/tmp/pktipc-ctest-XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    atexit(remove_dir);
    setenv("PKTIPC_RUNTIME_DIR", dir, 1);
    RUN(test_bad_options);
    RUN(test_no_broker);
    RUN(test_refusals);
    RUN(test_groups_and_modes);
    RUN(test_batches_released_in_any_order);
    RUN(test_one_release_message_for_many_slabs);
    RUN(test_release_wakes_a_consumer_without_credit);
    RUN(test_pollable_descriptor);
    RUN(test_dispatch);
    RUN(test_share_is_what_pktipc_select_says);
    RUN(test_share_release);
    RUN(test_filter);
    RUN(test_passed_on_share_comes_again);
    RUN(test_gaps_and_end_of_stream);
    RUN(test_evicted);
    RUN(test_impossible_headers);
    RUN(test_descriptors_are_copies);
    RUN(test_protocol_violations);
    RUN(test_heartbeats_and_a_silent_broker);
    RUN(test_reconnects_to_the_broker_that_takes_over);
    RUN(test_gives_up_when_no_broker_comes);
    RUN(test_strerror);
    RUN(test_linktypes_as_libpcap_reads_them);
    CHECK(rmdir(dir) == 0);     /* every test removed what it made */
    CHECK_EQ(open_fds(), fds);
    dir[0] = 0;
    return 0;
}
