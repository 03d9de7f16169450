/*
 * libpktipc: sending, the consuming thread's (see client.h): the TX area
 * this client makes and alone writes, the frames queued in it, TX messages
 * handing them to the broker, its TX_DONE answers.
 */
#define _GNU_SOURCE
#include <sys/random.h>

#include "client.h"


static int64_t deadline_ms(int timeout_ms)
{
    return timeout_ms < 0 ? INT64_MAX : now_ns() + timeout_ms * NS_PER_MS;
}

static void tx_free(pktipc_client *c)
{
    struct tx *t = c->tx;
    if (!t)
        return;
    if (t->base)
        munmap(t->base, t->size);
    shm_unlink(t->name);        /* gone already, but for a broker that never answered */
    free(t->max_len);
    free(t);
    c->tx = NULL;
}

/* Makes, lays out and maps the TX area: 0 or -PKTIPC_E*. */
static int make_area(pktipc_client *c, struct tx *t)
{
    unsigned frames = c->tx_frames ? c->tx_frames : TX_FRAMES;
    unsigned size = c->tx_frame_size ? c->tx_frame_size : TX_FRAME_SIZE;
    struct pktipc_tx_geometry g;
    if (pktipc_tx_geometry(frames, size, &g))
        return fail(c, PKTIPC_EINVAL, "a TX area holds a power of two of slots, up to %d, each "
                    "a multiple of %d bytes up to %d", PKTIPC_TX_MAX_FRAMES,
                    PKTIPC_TX_FRAME_ALIGN, PKTIPC_TX_MAX_FRAME_SIZE);
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd))
        rnd = (uint32_t)now_ns();
    snprintf(t->name, sizeof(t->name), "/pktipc.%s.tx-%s-%d-%08x",
             c->ipc_path && proto_name_ok(c->server) ? c->server : "remote", c->name,
             (int)getpid(), rnd);
    int fd = shm_open(t->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return fail(c, PKTIPC_ESYS, "shm_open %s: %s", t->name, strerror(errno));
    int r = 0;
    /* A broker of another user (not root) reads it as a member of its group. */
    if (c->owner > 0 && (uid_t)c->owner != geteuid() && c->owner_gid >= 0 &&
        (fchown(fd, (uid_t)-1, (gid_t)c->owner_gid) || fchmod(fd, 0640)))
        r = fail(c, PKTIPC_ESYS, "%s: giving the broker's group read access: %s", t->name,
                 strerror(errno));
    if (!r && ftruncate(fd, (off_t)g.total_size))
        r = fail(c, PKTIPC_ESYS, "%s: %s", t->name, strerror(errno));
    if (!r) {
        t->base = mmap(NULL, g.total_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (t->base == MAP_FAILED) {
            t->base = NULL;
            r = fail(c, PKTIPC_ESYS, "mapping %s: %s", t->name, strerror(errno));
        }
    }
    close(fd);
    if (r) {
        shm_unlink(t->name);
        return r;
    }
    t->size = g.total_size;
    t->h = (struct pktipc_tx_header){
        .layout_version = PKTIPC_TX_LAYOUT_VERSION, .header_size = PKTIPC_TX_HEADER_SIZE,
        .frame_count = frames, .frame_size = size, .desc_size = PKTIPC_TX_DESC_SIZE,
        .desc_off = g.desc_off, .frames_off = g.frames_off, .total_size = g.total_size};
    memcpy(t->base, &t->h, sizeof(t->h));
    struct pktipc_tx_header *h = (struct pktipc_tx_header *)t->base;
    h->magic = PKTIPC_TX_MAGIC;
    t->h.magic = PKTIPC_TX_MAGIC;
    t->batch = frames / 8 ? frames / 8 : 1;
    return 0;
}

/* The area offered and TX_READY back: 0 or -PKTIPC_E*. */
static int open_tx(pktipc_client *c)
{
    struct tx *t = calloc(1, sizeof(*t));
    if (!t)
        return fail(c, PKTIPC_ENOMEM, "out of memory");
    c->tx = t;
    int r = make_area(c, t);
    if (!r && (!c->sock || proto_tx_open(&c->conn, &c->out, now_ns(), t->name)))
        r = fail(c, PKTIPC_EGONE, "broker '%s' is not attached", c->server);
    if (!r && send_out(c))
        r = fail(c, PKTIPC_EGONE, "broker '%s' does not take messages", c->server);
    if (!r) {
        r = pump(c, now_ns() + PROTO_DEFAULT_TIMEOUT_MS * NS_PER_MS, WANT_TX_READY);
        if (r == 0)
            r = fail(c, PKTIPC_EGONE, "broker '%s' did not answer TX_OPEN", c->server);
    }
    if (c->tx)
        shm_unlink(t->name);    /* mapped by both now, or refused: the name goes */
    if (r < 0) {
        tx_free(c);
        return r;
    }
    return 0;
}

static int submit(pktipc_client *c)
{
    struct tx *t = c->tx;
    while (t->next > t->submitted) {
        uint64_t n = t->next - t->submitted;
        if (n > PROTO_MAX_TX)
            n = PROTO_MAX_TX;
        if (proto_tx(&c->conn, &c->out, now_ns(), t->submitted, (uint32_t)n) || send_out(c))
            return fail(c, PKTIPC_EGONE, "broker '%s' does not take messages", c->server);
        t->submitted += n;
        c->tx_submitted += n;
    }
    return 0;
}

int tx_wanted(const pktipc_client *c, int want)
{
    const struct tx *t = c->tx;
    if (!t)
        return 1;           /* lost with its broker: nothing more to wait for */
    if (want == WANT_TX_READY)
        return t->ready;
    if (want == WANT_TX_ROOM)
        return t->next - t->upto < t->h.frame_count;
    return t->upto == t->submitted;     /* WANT_TX_DONE */
}

int tx_alloc(pktipc_client *c, uint32_t len, unsigned iface, int timeout_ms, uint8_t **frame)
{
    int r;
    *frame = NULL;
    if (c->sticky)
        return c->sticky;
    if (!c->tx && (r = open_tx(c)) < 0)
        return r;
    struct tx *t = c->tx;
    t->cur = NULL;
    uint32_t most = iface < t->nlens ? t->max_len[iface] : 0;
    if (most > t->h.frame_size)
        most = t->h.frame_size;
    if (!most)
        return fail(c, PKTIPC_EINVAL, "broker '%s' does not send on interface %u", c->server,
                    iface);
    if (!len || len > most)
        return fail(c, PKTIPC_EINVAL, "a frame for interface %u has 1 to %u bytes, not %u",
                    iface, most, len);
    if (!tx_wanted(c, WANT_TX_ROOM)) {
        if ((r = submit(c)) < 0)
            return r;
        r = pump(c, deadline_ms(timeout_ms), WANT_TX_ROOM);
        if (r < 0)
            return r;
        if (!c->tx)
            return fail(c, PKTIPC_EGONE, "broker '%s' was lost with the frames it had not "
                        "taken", c->server);
        if (r == 0)
            return fail(c, PKTIPC_EAGAIN, "all %u slots of the TX area wait for the broker",
                        t->h.frame_count);
    }
    uint32_t slot = (uint32_t)(t->next & (t->h.frame_count - 1));
    struct pktipc_tx_desc *d = pktipc_tx_desc(t->base, &t->h, slot);
    d->iface = (uint16_t)iface;
    d->len = len;
    t->cur = pktipc_tx_frame(t->base, &t->h, slot);
    t->cur_len = len;
    *frame = t->cur;
    return 0;
}

int tx_send(pktipc_client *c, const uint8_t *frame, uint32_t len)
{
    struct tx *t = c->tx;
    if (!t || !t->cur || frame != t->cur)
        return fail(c, PKTIPC_EINVAL, "pktipc_tx_send takes the frame pktipc_tx_alloc gave last");
    if (!len || len > t->cur_len)
        return fail(c, PKTIPC_EINVAL, "the frame has 1 to %u bytes, not %u", t->cur_len, len);
    pktipc_tx_desc(t->base, &t->h, (uint32_t)(t->next & (t->h.frame_count - 1)))->len = len;
    t->cur = NULL;
    t->next++;
    return t->next - t->submitted >= t->batch ? submit(c) : 0;
}

int tx_flush(pktipc_client *c, int timeout_ms)
{
    int r;
    if (c->sticky)
        return c->sticky;
    struct tx *t = c->tx;
    if (!t)
        return 0;
    if ((r = submit(c)) < 0)
        return r;
    r = pump(c, deadline_ms(timeout_ms), WANT_TX_DONE);
    if (r < 0)
        return r;
    if (!(t = c->tx))
        return 0;
    if (t->upto < t->submitted)
        return (int)(t->submitted - t->upto);
    if (t->refused_unreported) {
        uint64_t n = t->refused_unreported;
        t->refused_unreported = 0;
        return fail(c, PKTIPC_EREFUSED, "broker '%s' refused %llu frame(s): %s", c->server,
                    (unsigned long long)n, t->why);
    }
    return 0;
}

int tx_on_ready(pktipc_client *c)
{
    struct tx *t = c->tx;
    const msgpack_object_array *a = &c->msg.f[F_TX_READY_MAX_LEN]->via.array;
    if (!t || t->ready)
        return die(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: TX_READY unasked",
                   c->server);
    t->max_len = calloc(a->size, sizeof(*t->max_len));
    if (!t->max_len)
        return die(c, PKTIPC_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < a->size; i++)
        t->max_len[i] = a->ptr[i].via.u64 > UINT32_MAX ? UINT32_MAX : (uint32_t)a->ptr[i].via.u64;
    t->nlens = a->size;
    t->ready = 1;
    return 0;
}

int tx_on_done(pktipc_client *c)
{
    struct tx *t = c->tx;
    uint64_t upto = proto_u64(&c->msg, F_TX_DONE_UPTO);
    uint64_t refused = proto_u64(&c->msg, F_TX_DONE_REFUSED);
    if (!t || upto <= t->upto || upto > t->submitted || refused > upto - t->upto)
        return die(c, PKTIPC_EPROTO, "broker '%s' broke the protocol: a TX_DONE for slots it "
                   "was not given", c->server);
    uint32_t n;
    const char *why = proto_str(&c->msg, F_TX_DONE_ERROR, &n);
    if (why)
        snprintf(t->why, sizeof(t->why), "%.*s", (int)n, why);
    c->tx_sent += upto - t->upto - refused;
    c->tx_refused += refused;
    t->refused_unreported += refused;
    t->upto = upto;
    return 0;
}

void tx_lost(pktipc_client *c)
{
    if (!c->tx)
        return;
    c->tx_lost += c->tx->submitted - c->tx->upto;
    tx_free(c);
}
