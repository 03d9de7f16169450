/* The client's side of the control protocol; see proto.h. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROTO_TABLES
#include "proto.h"

static int fail(char *why, size_t whylen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
    return -1;
}

/* --- names ----------------------------------------------------------------- */

static int name_ok_n(const char *s, size_t n)
{
    if (n == 0 || n > PROTO_NAME_MAX || !s[0] || !strchr(PROTO_NAME_FIRST, s[0]))
        return 0;
    for (size_t i = 1; i < n; i++)
        if (!s[i] || !strchr(PROTO_NAME_REST, s[i]))
            return 0;
    return 1;
}

int proto_name_ok(const char *s)
{
    return s && name_ok_n(s, strnlen(s, PROTO_NAME_MAX + 1));
}

/* --- decoding -------------------------------------------------------------- */

const char *proto_type_name(int type)
{
    return type >= 0 && type < PMSG_COUNT ? SCHEMAS[type].type : "?";
}

static uint64_t be(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* 0 when `p` holds exactly one msgpack object whose every array and map
 * announces no more items than there are bytes left. msgpack-c allocates a
 * container's items from its header before reading them, so without this a
 * five-byte frame could make it ask for tens of gigabytes. */
static int mp_scan(const uint8_t *p, size_t len)
{
    size_t i = 0;
    uint64_t todo = 1;    /* objects still to read */
    while (todo) {
        if (i >= len)
            return -1;
        todo--;
        uint8_t b = p[i++];
        uint64_t items = 0, skip = 0;
        unsigned nlen = 0;          /* bytes of a length that follows */
        int container = 0;          /* 1 array, 2 map */
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool */
        } else if (b <= 0x8f) {
            items = 2 * (uint64_t)(b & 0x0f);
        } else if (b <= 0x9f) {
            items = b & 0x0f;
        } else if (b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4: case 0xd9: nlen = 1; break;                  /* bin8, str8 */
            case 0xc5: case 0xda: nlen = 2; break;                  /* bin16, str16 */
            case 0xc6: case 0xdb: nlen = 4; break;                  /* bin32, str32 */
            case 0xc7: nlen = 1; skip = 1; break;                   /* ext8: length, type */
            case 0xc8: nlen = 2; skip = 1; break;
            case 0xc9: nlen = 4; skip = 1; break;
            case 0xca: skip = 4; break;                             /* float32 */
            case 0xcb: skip = 8; break;                             /* float64 */
            case 0xcc: case 0xd0: skip = 1; break;
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xce: case 0xd2: skip = 4; break;
            case 0xcf: case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break;                             /* fixext: type + data */
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc: nlen = 2; container = 1; break;
            case 0xdd: nlen = 4; container = 1; break;
            case 0xde: nlen = 2; container = 2; break;
            case 0xdf: nlen = 4; container = 2; break;
            default: return -1;                                     /* 0xc1: never used */
            }
        }
        if (nlen) {
            if (len - i < nlen)
                return -1;
            uint64_t n = be(p + i, nlen);
            i += nlen;
            if (container)
                items = container == 2 ? 2 * n : n;
            else
                skip += n;
        }
        if (skip > len - i)
            return -1;
        i += skip;
        todo += items;
        if (todo > len - i)
            return -1;
    }
    return i == len ? 0 : -1;
}

/* Characters in a UTF-8 string, or -1 if it is not valid UTF-8 (overlong
 * forms and surrogates included), as Python decodes it. */
static int64_t utf8_chars(const char *str, uint32_t n)
{
    const uint8_t *s = (const uint8_t *)str;
    int64_t chars = 0;
    for (uint32_t i = 0; i < n; chars++) {
        uint8_t b = s[i];
        unsigned more;
        uint32_t cp, min;
        if (b < 0x80) {
            i++;
            continue;
        } else if ((b & 0xe0) == 0xc0) {
            more = 1, cp = b & 0x1f, min = 0x80;
        } else if ((b & 0xf0) == 0xe0) {
            more = 2, cp = b & 0x0f, min = 0x800;
        } else if ((b & 0xf8) == 0xf0) {
            more = 3, cp = b & 0x07, min = 0x10000;
        } else {
            return -1;
        }
        if (n - i - 1 < more)
            return -1;
        for (unsigned k = 1; k <= more; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return -1;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return -1;
        i += more + 1;
    }
    return chars;
}

/* What Python's msgpack (raw=False, strict_map_key=True) refuses anywhere in
 * a frame: strings that are not UTF-8, map keys that are not str or bytes,
 * extension types the msgpack spec reserves (negative) other than the
 * timestamp, timestamps it cannot read. */
static int python_would_decode(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_STR:
        return utf8_chars(o->via.str.ptr, o->via.str.size) >= 0;
    case MSGPACK_OBJECT_ARRAY:
        for (uint32_t i = 0; i < o->via.array.size; i++)
            if (!python_would_decode(&o->via.array.ptr[i]))
                return 0;
        return 1;
    case MSGPACK_OBJECT_MAP:
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (kv->key.type != MSGPACK_OBJECT_STR && kv->key.type != MSGPACK_OBJECT_BIN)
                return 0;
            if (!python_would_decode(&kv->key) || !python_would_decode(&kv->val))
                return 0;
        }
        return 1;
    case MSGPACK_OBJECT_EXT:
        /* Type -1 is a timestamp: 4, 8 or 12 bytes, nanoseconds below 10^9. */
        if (o->via.ext.type != -1)
            return o->via.ext.type >= 0;
        if (o->via.ext.size == 4)
            return 1;
        if (o->via.ext.size == 8)
            return be((const uint8_t *)o->via.ext.ptr, 8) >> 34 < 1000000000;
        return o->via.ext.size == 12 && be((const uint8_t *)o->via.ext.ptr, 4) < 1000000000;
    default:
        return 1;
    }
}

static int str_is(const msgpack_object *o, const char *s)
{
    size_t n = strlen(s);
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n &&
           memcmp(o->via.str.ptr, s, n) == 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Distinct u32s, at most `most` of them. */
static int slots_ok(const msgpack_object_array *a, uint64_t most)
{
    uint32_t v[PROTO_MAX_MEMBERS];
    if (a->size > most || a->size > PROTO_MAX_MEMBERS)
        return 0;
    for (uint32_t i = 0; i < a->size; i++) {
        if (a->ptr[i].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a->ptr[i].via.u64 > UINT32_MAX)
            return 0;
        v[i] = (uint32_t)a->ptr[i].via.u64;
    }
    qsort(v, a->size, sizeof(v[0]), cmp_u32);
    for (uint32_t i = 1; i < a->size; i++)
        if (v[i] == v[i - 1])
            return 0;
    return 1;
}

static int check(const struct proto_rule *r, const msgpack_object *o)
{
    if (o->type == MSGPACK_OBJECT_NIL)
        return r->optional;
    switch (r->kind) {
    case CK_INT:
        return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 >= r->lo &&
               o->via.u64 <= r->hi;
    case CK_STR:
        return o->type == MSGPACK_OBJECT_STR &&
               (uint64_t)utf8_chars(o->via.str.ptr, o->via.str.size) <= r->hi;
    case CK_NAME:
        return o->type == MSGPACK_OBJECT_STR && name_ok_n(o->via.str.ptr, o->via.str.size);
    case CK_ONE_OF:
        for (const char *const *v = r->values; *v; v++)
            if (str_is(o, *v))
                return 1;
        return 0;
    case CK_SEQS:
        if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < r->lo ||
            o->via.array.size > r->hi)
            return 0;
        for (uint32_t i = 0; i < o->via.array.size; i++)
            if (o->via.array.ptr[i].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return 0;
        return 1;
    case CK_SLOTS:
        return o->type == MSGPACK_OBJECT_ARRAY && slots_ok(&o->via.array, r->hi);
    case CK_BYTES:
        return o->type == MSGPACK_OBJECT_BIN;
    case CK_MAP:
        return o->type == MSGPACK_OBJECT_MAP;
    }
    return 0;
}

static int bitmap_ok(const struct proto_msg *m, const struct proto_bitmap *b)
{
    uint32_t len;
    const uint8_t *bits = proto_bin(m, b->bits, &len);
    uint64_t n = proto_u64(m, b->count);
    return !bits || (len == (n + 7) / 8 && !(n % 8 && bits[len - 1] >> n % 8));
}

void proto_msg_init(struct proto_msg *m)
{
    memset(m, 0, sizeof(*m));
    msgpack_unpacked_init(&m->up);
}

void proto_msg_free(struct proto_msg *m)
{
    msgpack_unpacked_destroy(&m->up);
}

int proto_decode(struct proto_msg *m, const void *frame, size_t len, char *why, size_t whylen)
{
    m->type = -1;
    memset(m->f, 0, sizeof(m->f));
    if (len > PROTO_MAX_BROKER_FRAME)
        return fail(why, whylen, "too-large: frame of %zu bytes, limit %d", len,
                    PROTO_MAX_BROKER_FRAME);
    size_t off = 0;
    if (mp_scan(frame, len) != 0 ||
        msgpack_unpack_next(&m->up, frame, len, &off) != MSGPACK_UNPACK_SUCCESS ||
        off != len || !python_would_decode(&m->up.data))
        return fail(why, whylen, "malformed: not a msgpack frame");
    const msgpack_object *root = &m->up.data;
    if (root->type != MSGPACK_OBJECT_MAP)
        return fail(why, whylen, "malformed: frame is not a map");

    const msgpack_object *t = NULL, *v = NULL;
    const msgpack_object_map *map = &root->via.map;
    /* Before the quadratic search for a repeated key: a frame of millions of
     * keys would keep us busy for hours. */
    if (map->size > 2 + PROTO_MAX_FIELDS)
        return fail(why, whylen, "bad-field: %u fields, more than any message has", map->size);
    for (uint32_t i = 0; i < map->size; i++) {
        const msgpack_object *k = &map->ptr[i].key;
        for (uint32_t j = 0; j < i; j++)
            if (k->type == map->ptr[j].key.type && k->type == MSGPACK_OBJECT_STR &&
                k->via.str.size == map->ptr[j].key.via.str.size &&
                (!k->via.str.size ||    /* msgpack-c: no pointer for "", not for memcmp */
                 memcmp(k->via.str.ptr, map->ptr[j].key.via.str.ptr, k->via.str.size) == 0))
                return fail(why, whylen, "malformed: key repeated");
        if (str_is(k, "t"))
            t = &map->ptr[i].val;
        else if (str_is(k, "v"))
            v = &map->ptr[i].val;
    }
    if (!v || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 != PROTO_VERSION)
        return fail(why, whylen, "version: not protocol version %d", PROTO_VERSION);
    for (int ty = 0; t && ty < PMSG_COUNT; ty++)
        if (str_is(t, SCHEMAS[ty].type))
            m->type = ty;
    if (m->type < 0)
        return fail(why, whylen, "unknown-type: unknown message type");

    const struct proto_schema *s = &SCHEMAS[m->type];
    unsigned seen = 0;
    for (uint32_t i = 0; i < map->size; i++) {
        const msgpack_object *k = &map->ptr[i].key;
        if (str_is(k, "t") || str_is(k, "v"))
            continue;
        unsigned f = 0;
        while (f < s->nfields && !str_is(k, s->rules[f].name))
            f++;
        if (f == s->nfields)
            return fail(why, whylen, "bad-field: %s: unexpected field", s->type);
        if (!check(&s->rules[f], &map->ptr[i].val))
            return fail(why, whylen, "bad-field: %s.%s: bad value", s->type, s->rules[f].name);
        m->f[f] = map->ptr[i].val.type == MSGPACK_OBJECT_NIL ? NULL : &map->ptr[i].val;
        seen++;
    }
    if (seen != s->nfields)
        return fail(why, whylen, "bad-field: %s: missing fields", s->type);
    for (size_t i = 0; i < sizeof(BITMAPS) / sizeof(BITMAPS[0]); i++)
        if (BITMAPS[i].type == m->type && !bitmap_ok(m, &BITMAPS[i]))
            return fail(why, whylen, "bad-field: %s: fields disagree", s->type);
    return 0;
}

/* --- the connection ---------------------------------------------------------- */

void proto_conn_init(struct proto_conn *p, int64_t reconnect)
{
    memset(p, 0, sizeof(*p));
    p->state = ST_NEW;
    p->heartbeat = 1000000000;
    p->liveness = 30 * (int64_t)1000000000;
    p->reconnect = reconnect;
}

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

int proto_lost(struct proto_conn *p, int64_t now)
{
    if (!p->reconnect) {
        p->state = ST_CLOSED;
        return 0;
    }
    if (!p->lost) {
        p->lost = 1;
        p->lost_at = now;
        p->backoff = PROTO_BACKOFF_MIN_MS * PROTO_NS_PER_MS;
    }
    p->state = ST_LOST;
    p->retry_at = now;
    return 1;
}

static void attempt_failed(struct proto_conn *p, int64_t now)
{
    p->state = ST_LOST;
    p->retry_at = now + p->backoff;
    p->backoff = min64(2 * p->backoff, PROTO_BACKOFF_MAX_MS * PROTO_NS_PER_MS);
}

static int pack_str(msgpack_packer *pk, const char *s)
{
    return msgpack_pack_str_with_body(pk, s, strlen(s));
}

static int begin(msgpack_sbuffer *buf, msgpack_packer *pk, int type)
{
    msgpack_sbuffer_clear(buf);
    msgpack_packer_init(pk, buf, msgpack_sbuffer_write);
    return msgpack_pack_map(pk, 2 + SCHEMAS[type].nfields) | pack_str(pk, "t") |
           pack_str(pk, SCHEMAS[type].type) | pack_str(pk, "v") |
           msgpack_pack_uint64(pk, PROTO_VERSION);
}

static int key(msgpack_packer *pk, int type, int field)
{
    return pack_str(pk, SCHEMAS[type].rules[field].name);
}

static int str_or_nil(msgpack_packer *pk, const char *s)
{
    return s ? pack_str(pk, s) : msgpack_pack_nil(pk);
}

static int sent(struct proto_conn *p, int64_t now, int err)
{
    if (err)
        return -1;
    p->last_sent = now;
    return 0;
}

int proto_hello(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now, const char *name,
                const char *group, const char *policy, unsigned credit, uint32_t pid,
                const char *balance)
{
    msgpack_packer pk;
    if (p->state == ST_LOST && p->lost)
        p->attempt_end = min64(now + PROTO_ATTEMPT_MAX_MS * PROTO_NS_PER_MS,
                               p->lost_at + p->reconnect);
    else if (p->state != ST_NEW)
        return -1;
    int err = begin(buf, &pk, PMSG_HELLO);
    err |= key(&pk, PMSG_HELLO, F_HELLO_NAME) | pack_str(&pk, name);
    err |= key(&pk, PMSG_HELLO, F_HELLO_GROUP) | str_or_nil(&pk, group);
    err |= key(&pk, PMSG_HELLO, F_HELLO_POLICY) | str_or_nil(&pk, policy);
    err |= key(&pk, PMSG_HELLO, F_HELLO_CREDIT) |
           (credit ? msgpack_pack_uint64(&pk, credit) : msgpack_pack_nil(&pk));
    err |= key(&pk, PMSG_HELLO, F_HELLO_PID) | msgpack_pack_uint64(&pk, pid);
    err |= key(&pk, PMSG_HELLO, F_HELLO_BALANCE) | str_or_nil(&pk, balance);
    if (sent(p, now, err))
        return -1;
    p->state = ST_HELLO_SENT;
    return 0;
}

int proto_release(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now,
                  const uint64_t *seqs, size_t n)
{
    msgpack_packer pk;
    if ((p->state != ST_ATTACHED && p->state != ST_ENDED) || n < 1 || n > PROTO_MAX_RELEASE)
        return -1;
    int err = begin(buf, &pk, PMSG_RELEASE);
    err |= key(&pk, PMSG_RELEASE, F_RELEASE_SEQS) | msgpack_pack_array(&pk, n);
    for (size_t i = 0; i < n; i++)
        err |= msgpack_pack_uint64(&pk, seqs[i]);
    return sent(p, now, err);
}

int proto_tx_open(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now, const char *shm)
{
    msgpack_packer pk;
    if (p->state != ST_ATTACHED)
        return -1;
    int err = begin(buf, &pk, PMSG_TX_OPEN);
    err |= key(&pk, PMSG_TX_OPEN, F_TX_OPEN_SHM) | pack_str(&pk, shm);
    return sent(p, now, err);
}

int proto_tx(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now, uint64_t first, uint32_t n)
{
    msgpack_packer pk;
    if (p->state != ST_ATTACHED || n < 1 || n > PROTO_MAX_TX)
        return -1;
    int err = begin(buf, &pk, PMSG_TX);
    err |= key(&pk, PMSG_TX, F_TX_FIRST) | msgpack_pack_uint64(&pk, first);
    err |= key(&pk, PMSG_TX, F_TX_N) | msgpack_pack_uint64(&pk, n);
    return sent(p, now, err);
}

int proto_bye(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now)
{
    msgpack_packer pk;
    int attached = p->state == ST_ATTACHED || p->state == ST_ENDED;
    p->state = ST_CLOSED;
    if (!attached)
        return -1;
    return sent(p, now, begin(buf, &pk, PMSG_BYE));
}

/* A BATCH names no members, or ours among them. */
static int among(const msgpack_object *members, uint32_t slot)
{
    const msgpack_object_array *a = &members->via.array;
    for (uint32_t i = 0; i < a->size; i++)
        if (a->ptr[i].via.u64 == slot)
            return 1;
    return a->size == 0;
}

int proto_receive(struct proto_conn *p, const struct proto_msg *m, int64_t now, char *why,
                  size_t whylen)
{
    size_t i = 0, n = sizeof(CLIENT_TRANSITIONS) / sizeof(CLIENT_TRANSITIONS[0]);
    while (i < n && !(CLIENT_TRANSITIONS[i].from == p->state &&
                      CLIENT_TRANSITIONS[i].msg == m->type))
        i++;
    if (i == n)
        return fail(why, whylen, "unexpected: %s while %s", SCHEMAS[m->type].type,
                    STATE_NAMES[p->state]);
    if (m->type == PMSG_BATCH && !among(m->f[F_BATCH_MEMBERS], p->slot))
        return fail(why, whylen, "bad-field: batch: slot %u not among members", p->slot);
    if (m->type == PMSG_ERROR) {
        const msgpack_object *code = m->f[F_ERROR_CODE];
        if (proto_retrying(p) && str_is(code, "name-taken")) {
            attempt_failed(p, now);
            return PROTO_RX_ATTEMPT_FAILED;
        }
        if (p->state == ST_ATTACHED && str_is(code, "not-attached")) {
            proto_lost(p, now);
            return PROTO_RX_LOST;
        }
    }
    p->state = CLIENT_TRANSITIONS[i].to;
    p->last_recv = now;
    if (m->type == PMSG_WELCOME) {
        /* As the Python client: the broker's loop never blocks for long, so
         * it is lost after a few missed heartbeats; liveness_ms is how long
         * it waits for us, which our heartbeat interval keeps well inside. */
        uint64_t hb = proto_u64(m, F_WELCOME_HEARTBEAT_MS);
        uint64_t live = proto_u64(m, F_WELCOME_LIVENESS_MS);
        uint64_t ours = hb < live / 3 ? hb : live / 3;
        p->heartbeat = (int64_t)(ours ? ours : 1) * 1000000;
        p->liveness = PROTO_MISSED_HEARTBEATS * (int64_t)hb * 1000000;
        p->last_sent = now;
        p->slot = (uint32_t)proto_u64(m, F_WELCOME_SLOT);
    }
    return 0;
}

int64_t proto_timer(const struct proto_conn *p)
{
    /* Heartbeats go on after END-OF-STREAM, until BYE; a broker that has
     * sent END-OF-STREAM may exit, so it is never lost then. */
    if (p->state == ST_ENDED)
        return p->last_sent + p->heartbeat;
    if (p->state == ST_ATTACHED)
        return min64(p->last_sent + p->heartbeat, p->last_recv + p->liveness);
    if (proto_retrying(p))
        return min64(p->state == ST_LOST ? p->retry_at : p->attempt_end,
                     p->lost_at + p->reconnect);
    return INT64_MAX;
}

int proto_mapped(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now)
{
    msgpack_packer pk;
    if (p->state != ST_ATTACHED && p->state != ST_ENDED)
        return -1;
    if (p->lost) {
        p->lost = 0;
        p->reconnects++;
    }
    return sent(p, now, begin(buf, &pk, PMSG_HEARTBEAT));
}

int proto_failed(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now)
{
    msgpack_packer pk;
    int bye = (p->state == ST_ATTACHED || p->state == ST_ENDED) &&
              sent(p, now, begin(buf, &pk, PMSG_BYE)) == 0;
    if (p->lost)
        attempt_failed(p, now);
    else
        p->state = ST_CLOSED;
    return bye;
}

int proto_handle_timer(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now)
{
    msgpack_packer pk;
    if (proto_retrying(p)) {
        if (now >= p->lost_at + p->reconnect) {
            p->state = ST_CLOSED;
            return PROTO_TIMER_GAVE_UP;
        }
        if (p->state == ST_LOST)
            return now >= p->retry_at ? PROTO_TIMER_RETRY : PROTO_TIMER_NONE;
        if (now < p->attempt_end)
            return PROTO_TIMER_NONE;
        attempt_failed(p, now);
        return PROTO_TIMER_ATTEMPT_FAILED;
    }
    if (p->state != ST_ATTACHED && p->state != ST_ENDED)
        return PROTO_TIMER_NONE;
    if (p->state == ST_ATTACHED && p->last_recv + p->liveness <= now) {
        proto_lost(p, now);
        return PROTO_TIMER_LOST;
    }
    if (p->last_sent + p->heartbeat <= now) {
        if (sent(p, now, begin(buf, &pk, PMSG_HEARTBEAT)))
            return PROTO_TIMER_NONE;
        return PROTO_TIMER_SENT;
    }
    return PROTO_TIMER_NONE;
}
