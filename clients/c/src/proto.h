/*
 * The client's side of the control protocol, with no I/O and no clock, as
 * ClientConnection in pktipc/_protocol.py: frames and `now` (nanoseconds,
 * CLOCK_MONOTONIC) in, frames to send and decoded messages out. Every rule
 * (message types, fields and their bounds, what may come in which state)
 * comes from schema.h, which is generated from pktipc/_protocol.py.
 */
#ifndef PKTIPC_PROTO_H
#define PKTIPC_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

enum proto_check { CK_INT, CK_STR, CK_NAME, CK_ONE_OF, CK_SEQS, CK_SLOTS, CK_BYTES, CK_MAP };

struct proto_rule {
    const char *name;
    uint8_t kind;               /* enum proto_check */
    uint8_t optional;           /* nil is allowed too */
    uint64_t lo, hi;            /* int: bounds; str: hi = longest; seqs, slots: list length */
    const char *const *values;  /* one_of, NULL-terminated */
};

/* A rule across two fields of one message type: field `bits` is nil or
 * holds one bit for each of the `count` items field `count` gives, none set
 * beyond (Bitmap in _protocol.py). */
struct proto_bitmap {
    uint8_t type, bits, count;
};

struct proto_schema {
    const char *type;
    unsigned nfields;
    const struct proto_rule *rules;
};

struct proto_transition {
    uint8_t from, msg, to;
};

#include "schema.h"

/* A decoded frame: its type and its fields in schema order (NULL where the
 * field is nil). The objects live in `up` and point into the frame's bytes,
 * so both must outlive their use. */
struct proto_msg {
    int type;
    const msgpack_object *f[PROTO_MAX_FIELDS];
    msgpack_unpacked up;
};

void proto_msg_init(struct proto_msg *m);
void proto_msg_free(struct proto_msg *m);

/* Decodes and checks one frame from the broker: 0, or -1 with the reason
 * ("code: text", as the Python side names it) in why. */
int proto_decode(struct proto_msg *m, const void *frame, size_t len, char *why, size_t whylen);

static inline uint64_t proto_u64(const struct proto_msg *m, int field)
{
    return m->f[field]->via.u64;
}

/* A string field's bytes (not NUL-terminated); NULL when it is nil. */
static inline const char *proto_str(const struct proto_msg *m, int field, uint32_t *len)
{
    const msgpack_object *o = m->f[field];
    if (!o) {
        *len = 0;
        return NULL;
    }
    *len = o->via.str.size;
    return o->via.str.ptr;
}

/* A bytes field's bytes; NULL when it is nil. */
static inline const uint8_t *proto_bin(const struct proto_msg *m, int field, uint32_t *len)
{
    const msgpack_object *o = m->f[field];
    if (!o) {
        *len = 0;
        return NULL;
    }
    *len = o->via.bin.size;
    return (const uint8_t *)o->via.bin.ptr;
}

/* A slots field's values into out[] (room for PROTO_MAX_MEMBERS): their number. */
static inline uint32_t proto_slots(const struct proto_msg *m, int field, uint32_t *out)
{
    const msgpack_object_array *a = &m->f[field]->via.array;
    for (uint32_t i = 0; i < a->size; i++)
        out[i] = (uint32_t)a->ptr[i].via.u64;
    return a->size;
}

/* A message type's name, as on the wire. */
const char *proto_type_name(int type);

/* 1 if `s` is a valid client, group or broker name. */
int proto_name_ok(const char *s);

/* One attachment, and, once the broker is lost, the attempts to attach to
 * the one that takes its place (`reconnect` ns in all; 0: never), as
 * ClientConnection: each attempt is a new connection the caller opens when
 * proto_handle_timer says PROTO_TIMER_RETRY, with proto_hello. */
struct proto_conn {
    int state;                  /* enum proto_state */
    uint32_t slot;              /* ours, from WELCOME */
    int64_t heartbeat;          /* ns between our heartbeats */
    int64_t liveness;           /* ns of silence after which the broker is lost */
    int64_t last_recv, last_sent;
    int64_t reconnect;
    int lost;                   /* the broker was lost at lost_at, and not yet replaced */
    int64_t lost_at, retry_at, attempt_end, backoff;
    uint64_t reconnects;        /* attachments to a broker that took a lost one's place */
};

#define PROTO_NS_PER_MS INT64_C(1000000)

void proto_conn_init(struct proto_conn *p, int64_t reconnect);

/* Looking for a broker to take a lost one's place. */
static inline int proto_retrying(const struct proto_conn *p)
{
    return p->lost && (p->state == ST_LOST || p->state == ST_HELLO_SENT);
}

/* Each encoder writes one frame into buf (emptied first) and counts it as
 * sent at `now`; -1 when the state does not allow the message. HELLO is
 * the first message of an attachment, or of an attempt after
 * PROTO_TIMER_RETRY. */
int proto_hello(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now, const char *name,
                const char *group, const char *policy, unsigned credit, uint32_t pid,
                const char *balance);
int proto_release(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now,
                  const uint64_t *seqs, size_t n);   /* 1 <= n <= PROTO_MAX_RELEASE */
int proto_bye(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now);  /* -1: not attached */
/* TX_OPEN offers the TX area named shm; TX names slots first .. first + n - 1
 * (1 <= n <= PROTO_MAX_TX). -1: not attached. */
int proto_tx_open(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now, const char *shm);
int proto_tx(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now, uint64_t first, uint32_t n);
/* The segment WELCOME named is mapped (a HEARTBEAT): until it hears from a
 * client after WELCOME, a broker keeps its segment. -1: not attached. */
int proto_mapped(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now);

/* The broker is gone (the caller saw its connection fail): 1 if a broker
 * taking its place is looked for (ST_LOST, an attempt due at once), 0 if
 * not (ST_CLOSED). */
int proto_lost(struct proto_conn *p, int64_t now);

/* The caller could not make the attempt (no broker's socket there) or use
 * its WELCOME (the segment is gone, of another layout, a broker breaking
 * the protocol): ST_LOST with the next attempt later while looking for a
 * broker, else ST_CLOSED. 1 when buf holds a BYE to send (it was welcomed). */
int proto_failed(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now);

enum { PROTO_RX_OK, PROTO_RX_ATTEMPT_FAILED, PROTO_RX_LOST };
/* Applies a decoded frame to the state machine: PROTO_RX_OK; -1 with why
 * if its type may not come in this state, or if it is a BATCH that names
 * members but not our slot; ATTEMPT_FAILED for a name still taken while
 * looking for a broker (our old self may linger a while: the next attempt
 * is later); LOST for a broker that does not know us (as proto_lost). */
int proto_receive(struct proto_conn *p, const struct proto_msg *m, int64_t now, char *why,
                  size_t whylen);

/* When proto_handle_timer must next be called; INT64_MAX: never. */
int64_t proto_timer(const struct proto_conn *p);

enum {
    PROTO_TIMER_NONE,
    PROTO_TIMER_SENT,           /* buf holds a heartbeat to send */
    PROTO_TIMER_LOST,           /* nothing heard for the liveness: as proto_lost */
    PROTO_TIMER_RETRY,          /* time for an attempt: a new connection, proto_hello */
    PROTO_TIMER_ATTEMPT_FAILED, /* no WELCOME in time: close its connection */
    PROTO_TIMER_GAVE_UP,        /* no broker took the place within `reconnect` (ST_CLOSED) */
};
int proto_handle_timer(struct proto_conn *p, msgpack_sbuffer *buf, int64_t now);

#endif /* PKTIPC_PROTO_H */
