/*
 * pktipc-pool: a consumer shaped like Suricata's. A capture thread takes
 * batches and hands each packet, by its descriptor, to a worker thread. The
 * worker reads the packet and keeps it in a pool of held packets, as
 * Suricata keeps a packet until its packet pool recycles it: when the pool
 * is full it releases one held packet picked at random, and when traffic
 * pauses it releases the whole pool, in random order. Releases come from
 * the worker, out of order; the capture thread alone talks to the broker,
 * which gets one message per slab given back.
 *
 *     pktipc-pool [-n NAME] [-g GROUP] [-b flow|round-robin] [-p drop|block] [-C CREDIT]
 *                 [-s POOL] [-l SECONDS] SERVER
 *
 * At the end of the stream it prints what it saw and what it gave back;
 * -l keeps it attached that much longer (see it with `pktipc status`).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <pktipc.h>

#define QUEUE_SIZE (1u << 16)
#define IDLE_MS 1

/* Packets from the capture thread to the worker; NULL ends the stream. */
struct queue {
    pthread_mutex_t lock;
    pthread_cond_t nonempty, nonfull;
    const struct pktipc_pkt *q[QUEUE_SIZE];
    unsigned head, len;
};

struct worker {
    pktipc_client *c;
    struct queue *queue;
    const struct pktipc_pkt **pool;
    unsigned pool_size, held;
    uint64_t rng;
    unsigned long long packets, bytes, released, errors;
    uint32_t checksum;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void push(struct queue *q, const struct pktipc_pkt *p)
{
    pthread_mutex_lock(&q->lock);
    while (q->len == QUEUE_SIZE)
        pthread_cond_wait(&q->nonfull, &q->lock);
    q->q[(q->head + q->len++) % QUEUE_SIZE] = p;
    pthread_cond_signal(&q->nonempty);
    pthread_mutex_unlock(&q->lock);
}

/* The next packet, or 0 when none came within IDLE_MS (*p untouched). */
static int pop(struct queue *q, const struct pktipc_pkt **p)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += IDLE_MS * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&q->lock);
    while (!q->len)
        if (pthread_cond_timedwait(&q->nonempty, &q->lock, &until) == ETIMEDOUT)
            break;
    int got = q->len > 0;
    if (got) {
        *p = q->q[q->head];
        q->head = (q->head + 1) % QUEUE_SIZE;
        q->len--;
        pthread_cond_signal(&q->nonfull);
    }
    pthread_mutex_unlock(&q->lock);
    return got;
}

static unsigned random_below(struct worker *w, unsigned n)
{
    w->rng ^= w->rng << 13;
    w->rng ^= w->rng >> 7;
    w->rng ^= w->rng << 17;
    return (unsigned)(w->rng % n);
}

static void give_back(struct worker *w, const struct pktipc_pkt *p)
{
    if (pktipc_release(w->c, p) == 0)
        w->released++;
    else
        w->errors++;
}

static void flush_pool(struct worker *w)
{
    while (w->held) {
        unsigned i = random_below(w, w->held);
        give_back(w, w->pool[i]);
        w->pool[i] = w->pool[--w->held];
    }
}

static void *work(void *arg)
{
    struct worker *w = arg;
    for (;;) {
        const struct pktipc_pkt *p;
        if (!pop(w->queue, &p)) {
            flush_pool(w);
            continue;
        }
        if (!p)
            break;
        /* The inspection: every byte of the packet. */
        const uint8_t *d = pktipc_pkt_data(w->c, p);
        uint32_t h = w->checksum;
        for (uint32_t i = 0; i < p->caplen; i++)
            h = (h ^ d[i]) * 16777619u;
        w->checksum = h;
        w->packets++;
        w->bytes += p->caplen;
        if (w->held == w->pool_size) {
            unsigned i = random_below(w, w->held);
            give_back(w, w->pool[i]);
            w->pool[i] = p;
        } else {
            w->pool[w->held++] = p;
        }
    }
    flush_pool(w);
    return NULL;
}

static void usage(void)
{
    fprintf(stderr, "usage: pktipc-pool [-n NAME] [-g GROUP] [-b flow|round-robin] "
                    "[-p drop|block] [-C CREDIT] [-s POOL] [-l SECONDS] SERVER\n");
    exit(2);
}

static long number(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "pktipc-pool: not a number between %ld and %ld: %s\n", lo, hi, s);
        exit(2);
    }
    return v;
}

static int balance_of(const char *s)
{
    if (!strcmp(s, "flow"))
        return PKTIPC_BALANCE_FLOW;
    if (!strcmp(s, "round-robin"))
        return PKTIPC_BALANCE_ROUND_ROBIN;
    fprintf(stderr, "pktipc-pool: -b takes flow or round-robin, not %s\n", s);
    exit(2);
}

int main(int argc, char **argv)
{
    char name[64], errbuf[PKTIPC_ERRBUF_SIZE];
    snprintf(name, sizeof(name), "pool-%d", (int)getpid());
    struct pktipc_opts o = {.sz = sizeof(o), .name = name, .timeout_ms = -1,
                            .reconnect_ms = -1, .errbuf = errbuf};
    unsigned pool_size = 1024;
    long linger = 0;
    int opt;
    while ((opt = getopt(argc, argv, "n:g:b:p:C:s:l:")) != -1) {
        switch (opt) {
        case 'n': o.name = optarg; break;
        case 'g': o.group = optarg; break;
        case 'b': o.balance = balance_of(optarg); break;
        case 'p':
            if (strcmp(optarg, "drop") && strcmp(optarg, "block"))
                usage();
            o.policy = strcmp(optarg, "block") ? PKTIPC_POLICY_DROP : PKTIPC_POLICY_BLOCK;
            break;
        case 'C': o.credit = (unsigned)number(optarg, 1, 4096); break;
        case 's': pool_size = (unsigned)number(optarg, 1, 1 << 24); break;
        case 'l': linger = number(optarg, 0, 86400); break;
        default: usage();
        }
    }
    if (optind != argc - 1)
        usage();
    o.server = argv[optind];
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    static struct queue queue = {.lock = PTHREAD_MUTEX_INITIALIZER,
                                 .nonempty = PTHREAD_COND_INITIALIZER,
                                 .nonfull = PTHREAD_COND_INITIALIZER};
    struct worker w = {.queue = &queue, .pool_size = pool_size, .rng = 0x9e3779b97f4a7c15u,
                       .checksum = 2166136261u};
    w.pool = calloc(pool_size, sizeof(*w.pool));
    if (!w.pool) {
        fprintf(stderr, "pktipc-pool: out of memory\n");
        return 1;
    }
    int r = pktipc_open(&o, &w.c);
    if (r < 0) {
        fprintf(stderr, "pktipc-pool: %s\n", errbuf);
        free(w.pool);
        return 1;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, work, &w)) {
        fprintf(stderr, "pktipc-pool: cannot start the worker\n");
        pktipc_close(w.c);
        free(w.pool);
        return 1;
    }
    struct pktipc_batch b;
    while (!stop) {
        r = pktipc_next_batch(w.c, &b, -1);
        if (r < 0 && r != -PKTIPC_EINTR)
            break;
        for (int i = 0; i < r; i++)
            push(&queue, &b.pkts[i]);
    }
    push(&queue, NULL);
    pthread_join(t, NULL);

    /* The worker's last releases go out with this call. */
    struct pktipc_stats st;
    pktipc_stats(w.c, &st, sizeof(st));
    printf("packets %llu bytes %llu checksum %08x released %llu release_errors %llu "
           "batches %llu batches_released %llu release_msgs %llu held %llu drops %llu\n",
           w.packets, w.bytes, w.checksum, w.released, w.errors,
           (unsigned long long)st.batches, (unsigned long long)st.released,
           (unsigned long long)st.release_msgs, (unsigned long long)st.held,
           (unsigned long long)st.drops);
    fflush(stdout);
    int status = 0;
    if (r < 0 && r != -PKTIPC_EINTR && (r != -PKTIPC_EEOS || *pktipc_geterr(w.c))) {
        fprintf(stderr, "pktipc-pool: %s\n", pktipc_geterr(w.c));
        status = 1;
    }
    for (long s = 0; s < linger && !stop; s++)
        sleep(1);
    pktipc_close(w.c);
    free(w.pool);
    return status;
}
