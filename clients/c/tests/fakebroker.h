/*
 * A fake broker for the client's tests: a real ZeroMQ ROUTER socket and a
 * real POSIX shared-memory segment laid out by pktipc_shm.h, driven step by
 * step by the test, which can so send what no real broker would.
 */
#ifndef PKTIPC_FAKEBROKER_H
#define PKTIPC_FAKEBROKER_H

#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include "check.h"
#include "pktipc.h"
#include "proto.h"

struct fb {
    void *ctx, *sock;
    char endpoint[256], shm[80];
    uint8_t *seg;
    size_t size;
    struct pktipc_header *h;
    uint32_t slabs, slab_size;
    uint64_t epoch, seq;
    uint8_t peer[256];
    size_t peer_len;
    uint32_t slot;              /* the client's, in WELCOME */
    char group[64], balance[16];    /* WELCOME's: what the last HELLO asked for */
    msgpack_sbuffer sb;
    msgpack_packer pk;
    struct proto_msg m;         /* the last message received */
};

/* Segments of fake brokers not freed yet: a failed CHECK exits, and they
 * go with it. */
static char fb_live[32][80];

static void fb_unlink_live(void)
{
    for (size_t i = 0; i < sizeof(fb_live) / sizeof(fb_live[0]); i++)
        if (fb_live[i][0])
            shm_unlink(fb_live[i]);
}

static void fb_track(const char *shm, int live)
{
    static int registered;
    if (!registered++)
        atexit(fb_unlink_live);
    for (size_t i = 0; i < sizeof(fb_live) / sizeof(fb_live[0]); i++) {
        if (live ? !fb_live[i][0] : !strcmp(fb_live[i], shm)) {
            snprintf(fb_live[i], sizeof(fb_live[i]), "%s", live ? shm : "");
            return;
        }
    }
}

static uint64_t fb_align(uint64_t n, uint64_t a)
{
    return (n + a - 1) / a * a;
}

static void fb_init(struct fb *f, const char *dir, const char *name, uint32_t slabs,
                    uint32_t slab_size)
{
    static uint64_t epochs;
    struct timespec ts;
    memset(f, 0, sizeof(*f));
    clock_gettime(CLOCK_REALTIME, &ts);
    f->epoch = (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec + ++epochs;
    f->slabs = slabs;
    f->slab_size = slab_size;
    snprintf(f->shm, sizeof(f->shm), "/pktipc.%s.%016llx", name, (unsigned long long)f->epoch);
    struct pktipc_geometry g;
    CHECK(pktipc_geometry(slab_size, slabs, 1, 0, 0, &g) == 0);
    f->size = g.total_size;
    int fd = shm_open(f->shm, O_CREAT | O_EXCL | O_RDWR, 0600);
    CHECK(fd >= 0);
    fb_track(f->shm, 1);
    CHECK(ftruncate(fd, (off_t)f->size) == 0);
    f->seg = mmap(NULL, f->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(f->seg != MAP_FAILED);
    close(fd);
    struct pktipc_header *h = f->h = (struct pktipc_header *)f->seg;
    h->layout_version = PKTIPC_LAYOUT_VERSION;
    h->header_size = PKTIPC_HEADER_SIZE;
    h->epoch = f->epoch;
    h->broker_pid = (uint32_t)getpid();
    h->state = PKTIPC_STATE_RUNNING;
    h->slab_size = slab_size;
    h->slab_count = slabs;
    h->desc_size = PKTIPC_DESC_SIZE;
    h->batch_rec_size = PKTIPC_BATCH_REC_SIZE;
    h->iface_count = 1;
    h->iface_size = PKTIPC_IFACE_SIZE;
    h->iface_table_off = g.iface_table_off;
    h->batch_table_off = g.batch_table_off;
    h->slabs_off = g.slabs_off;
    h->frames_off = g.frames_off;
    h->total_size = g.total_size;
    snprintf(h->name, sizeof(h->name), "%s", name);
    struct pktipc_iface *i = (struct pktipc_iface *)(f->seg + g.iface_table_off);
    snprintf(i->name, sizeof(i->name), "fake");
    i->linktype = 1;
    i->snaplen = 65535;
    i->kind = PKTIPC_IFACE_FILE;
    h->magic = PKTIPC_MAGIC;

    int zero = 0;
    snprintf(f->endpoint, sizeof(f->endpoint), "ipc://%s/%s.ctl", dir, name);
    f->ctx = zmq_ctx_new();
    f->sock = zmq_socket(f->ctx, ZMQ_ROUTER);
    zmq_setsockopt(f->sock, ZMQ_LINGER, &zero, sizeof(zero));
    CHECK(zmq_bind(f->sock, f->endpoint) == 0);
    msgpack_sbuffer_init(&f->sb);
    msgpack_packer_init(&f->pk, &f->sb, msgpack_sbuffer_write);
    proto_msg_init(&f->m);
}

/* Stops listening; the segment stays until fb_free, as a killed broker's would. */
static void fb_close_socket(struct fb *f)
{
    if (f->sock) {
        zmq_close(f->sock);
        f->sock = NULL;
        zmq_ctx_term(f->ctx);
        unlink(f->endpoint + strlen("ipc://"));
    }
}

static void fb_free(struct fb *f)
{
    fb_close_socket(f);
    munmap(f->seg, f->size);
    shm_unlink(f->shm);
    fb_track(f->shm, 0);
    msgpack_sbuffer_destroy(&f->sb);
    proto_msg_free(&f->m);
}

/* The next message's type, -1 if none came in time, -2 if it did not decode. */
static int fb_recv(struct fb *f, int timeout_ms)
{
    zmq_pollitem_t item = {f->sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&item, 1, timeout_ms) <= 0)
        return -1;
    int more;
    size_t more_size = sizeof(more);
    int n = zmq_recv(f->sock, f->peer, sizeof(f->peer), 0);
    CHECK(n > 0);
    f->peer_len = (size_t)n;
    static char frame[1 << 16];
    n = zmq_recv(f->sock, frame, sizeof(frame), 0);
    CHECK(n >= 0);
    zmq_getsockopt(f->sock, ZMQ_RCVMORE, &more, &more_size);
    CHECK(!more);
    char why[200];
    if (proto_decode(&f->m, frame, (size_t)n, why, sizeof(why)))
        return -2;
    if (f->m.type == PMSG_HELLO) {
        /* As a broker: the group asked for, else the client's own. */
        uint32_t len;
        const char *g = proto_str(&f->m, F_HELLO_GROUP, &len);
        if (!g)
            g = proto_str(&f->m, F_HELLO_NAME, &len);
        snprintf(f->group, sizeof(f->group), "%.*s", (int)len, g);
        const char *b = proto_str(&f->m, F_HELLO_BALANCE, &len);
        snprintf(f->balance, sizeof(f->balance), "%.*s", b ? (int)len : 4, b ? b : "flow");
    }
    return f->m.type;
}

/* Waits for a message of `type`, skipping heartbeats: 1 if it came. */
static int fb_expect(struct fb *f, int type, int timeout_ms)
{
    for (;;) {
        int t = fb_recv(f, timeout_ms);
        if (t == type)
            return 1;
        if (t != PMSG_HEARTBEAT)
            return 0;
    }
}

static void fb_raw(struct fb *f, const void *frame, size_t len)
{
    CHECK(zmq_send(f->sock, f->peer, f->peer_len, ZMQ_SNDMORE) >= 0);
    CHECK(zmq_send(f->sock, frame, len, 0) >= 0);
}

static void fb_send(struct fb *f)
{
    fb_raw(f, f->sb.data, f->sb.size);
}

static void fb_key(struct fb *f, const char *k)
{
    msgpack_pack_str_with_body(&f->pk, k, strlen(k));
}

static void fb_u64(struct fb *f, const char *k, uint64_t v)
{
    fb_key(f, k);
    msgpack_pack_uint64(&f->pk, v);
}

static void fb_str(struct fb *f, const char *k, const char *v)
{
    fb_key(f, k);
    fb_key(f, v);
}

static void fb_head(struct fb *f, const char *type, size_t nfields)
{
    msgpack_sbuffer_clear(&f->sb);
    msgpack_pack_map(&f->pk, 2 + nfields);
    fb_str(f, "t", type);
    fb_u64(f, "v", PROTO_VERSION);
}

/* WELCOME's fields after shm, epoch and layout. */
static void fb_welcome_rest(struct fb *f, unsigned credit, unsigned hb_ms, unsigned live_ms)
{
    fb_u64(f, "slot", f->slot);
    fb_u64(f, "credit", credit);
    fb_str(f, "policy", "drop");
    fb_u64(f, "heartbeat_ms", hb_ms);
    fb_u64(f, "liveness_ms", live_ms);
    fb_str(f, "group", f->group);
    fb_str(f, "balance", f->balance);
}

static void fb_welcome(struct fb *f, unsigned credit, unsigned hb_ms, unsigned live_ms)
{
    fb_head(f, "welcome", 10);
    fb_str(f, "shm", f->shm);
    fb_u64(f, "epoch", f->epoch);
    fb_u64(f, "layout", PKTIPC_LAYOUT_VERSION);
    fb_welcome_rest(f, credit, hb_ms, live_ms);
    fb_send(f);
}

static void fb_error(struct fb *f, const char *type, const char *code, const char *text)
{
    fb_head(f, type, 2);
    fb_str(f, "code", code);
    fb_str(f, "text", text);
    fb_send(f);
}

/* Byte j of packet i of the batch that starts at seq. */
static uint8_t fb_byte(uint64_t seq, uint32_t i, uint32_t j)
{
    return (uint8_t)(seq * 7 + i * 3 + j);
}

/* Packet i's flow hash, in the batch that starts at seq: spread, so that
 * members share a batch. */
static uint32_t fb_hash(uint64_t seq, uint32_t i)
{
    return (uint32_t)((seq + i) * 2654435761u >> 7);
}

/* Fills a slab with n packets of caplen bytes, as a broker does (frames
 * from the end down), and publishes its record: the batch's seq. */
static uint64_t fb_fill(struct fb *f, uint32_t slab, uint32_t n, uint32_t caplen)
{
    uint8_t *base = f->seg + f->h->slabs_off + (uint64_t)slab * f->slab_size;
    struct pktipc_pkt *d = (struct pktipc_pkt *)base;
    uint64_t seq = f->seq;
    uint32_t low = f->slab_size;
    CHECK((uint64_t)n * (PKTIPC_DESC_SIZE + fb_align(caplen, 8)) <= f->slab_size);
    for (uint32_t i = 0; i < n; i++) {
        low -= (uint32_t)fb_align(caplen, 8);
        d[i] = (struct pktipc_pkt){.ts_ns = (int64_t)(seq + i), .data_off = low,
                                   .caplen = caplen, .wirelen = caplen + 1,
                                   .hash = fb_hash(seq, i), .linktype = 1};
        for (uint32_t j = 0; j < caplen; j++)
            base[low + j] = fb_byte(seq, i, j);
    }
    struct pktipc_batch_rec *rec =
        (struct pktipc_batch_rec *)(f->seg + f->h->batch_table_off) + slab;
    rec->slab = slab;
    rec->gen++;
    rec->count = n;
    rec->data_bytes = f->slab_size - low;
    __atomic_store_n(&rec->seq, seq, __ATOMIC_RELEASE);
    f->seq += n;
    return seq;
}

/* BATCH for a share: members[0..nmembers), mask (NULL: nil) of masklen bytes. */
static void fb_share_msg(struct fb *f, uint64_t seq, uint32_t slab, uint32_t gen, uint32_t n,
                         const uint32_t *members, uint32_t nmembers, const void *mask,
                         size_t masklen)
{
    fb_head(f, "batch", 6);
    fb_u64(f, "seq", seq);
    fb_u64(f, "slab", slab);
    fb_u64(f, "gen", gen);
    fb_u64(f, "n", n);
    fb_key(f, "members");
    msgpack_pack_array(&f->pk, nmembers);
    for (uint32_t i = 0; i < nmembers; i++)
        msgpack_pack_uint32(&f->pk, members[i]);
    fb_key(f, "mask");
    if (mask) {
        msgpack_pack_bin(&f->pk, masklen);
        msgpack_pack_bin_body(&f->pk, mask, masklen);
    } else {
        msgpack_pack_nil(&f->pk);
    }
    fb_send(f);
}

static void fb_batch_msg(struct fb *f, uint64_t seq, uint32_t slab, uint32_t gen, uint32_t n)
{
    fb_share_msg(f, seq, slab, gen, n, NULL, 0, NULL, 0);
}

static const struct pktipc_pkt *fb_pkts(struct fb *f, uint32_t slab)
{
    return (const struct pktipc_pkt *)(f->seg + f->h->slabs_off + (uint64_t)slab * f->slab_size);
}

static uint32_t fb_gen(struct fb *f, uint32_t slab)
{
    return ((struct pktipc_batch_rec *)(f->seg + f->h->batch_table_off))[slab].gen;
}

static uint64_t fb_batch(struct fb *f, uint32_t slab, uint32_t n, uint32_t caplen)
{
    uint64_t seq = fb_fill(f, slab, n, caplen);
    struct pktipc_batch_rec *rec =
        (struct pktipc_batch_rec *)(f->seg + f->h->batch_table_off) + slab;
    fb_batch_msg(f, seq, slab, rec->gen, n);
    return seq;
}

#endif
