/*
 * libFuzzer target: libpktipc's protocol decoder (clients/c/src/proto.c)
 * over frames from a broker. It never crashes, and its verdicts hold
 * together:
 *   - the same frame gets the same verdict twice; a refusal gives a reason
 *     that starts with one of the protocol's error codes;
 *   - an accepted frame has every field its type requires, each passing its
 *     rule, and decodes the same once packed again;
 *   - the state machine takes an accepted message in exactly the states
 *     the transition table lists (a BATCH only if it names our slot or no
 *     member), moving to the state the table gives, and stays put otherwise.
 * Run over files with PKTIPC_FUZZ_REPORT set, it prints each verdict ("ID ok
 * TYPE" or "ID refused REASON", ID from input_id()): the tests give what this fuzzer found to the
 * Python decoder too, which must judge every frame alike (tests/cfuzz.py).
 */
#include <string.h>

#define PROTO_TABLES
#include "proto.h"
#include "harness.h"

#define NOW INT64_C(1000000000000)

static const char *const CODES[] = {"too-large: ", "malformed: ", "version: ",
                                    "unknown-type: ", "bad-field: "};

static int decode(struct proto_msg *m, const void *frame, size_t len, char *why, size_t whylen)
{
    why[0] = 0;
    int r = proto_decode(m, frame, len, why, whylen);
    CHECK(r == 0 || r == -1, "proto_decode returned %d", r);
    if (r == 0) {
        CHECK(m->type >= 0 && m->type < PMSG_COUNT, "type %d", m->type);
        return 0;
    }
    int coded = 0;
    for (size_t i = 0; i < sizeof(CODES) / sizeof(CODES[0]); i++)
        coded |= strncmp(why, CODES[i], strlen(CODES[i])) == 0;
    CHECK(coded, "refused for '%s'", why);
    return -1;
}

/* Every field the type has is there, as its rule says; none beyond. */
static void check_fields(const struct proto_msg *m)
{
    const struct proto_schema *s = &SCHEMAS[m->type];
    for (unsigned f = 0; f < PROTO_MAX_FIELDS; f++) {
        const msgpack_object *o = m->f[f];
        if (f >= s->nfields) {
            CHECK(!o, "%s: field %u beyond the schema", s->type, f);
            continue;
        }
        const struct proto_rule *r = &s->rules[f];
        CHECK(o || r->optional, "%s.%s missing", s->type, r->name);
        if (!o)
            continue;
        switch (r->kind) {
        case CK_INT:
            CHECK(o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 >= r->lo &&
                  o->via.u64 <= r->hi, "%s.%s", s->type, r->name);
            break;
        case CK_STR: case CK_NAME: case CK_ONE_OF:
            CHECK(o->type == MSGPACK_OBJECT_STR, "%s.%s", s->type, r->name);
            break;
        case CK_SEQS: case CK_SLOTS:
            CHECK(o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size <= r->hi,
                  "%s.%s", s->type, r->name);
            for (uint32_t i = 0; i < o->via.array.size; i++)
                CHECK(o->via.array.ptr[i].type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
                      (r->kind == CK_SEQS || o->via.array.ptr[i].via.u64 <= UINT32_MAX),
                      "%s.%s[%u]", s->type, r->name, i);
            break;
        case CK_BYTES:
            CHECK(o->type == MSGPACK_OBJECT_BIN, "%s.%s", s->type, r->name);
            break;
        case CK_MAP:
            CHECK(o->type == MSGPACK_OBJECT_MAP, "%s.%s", s->type, r->name);
            break;
        default:
            CHECK(0, "%s.%s: rule kind %u", s->type, r->name, r->kind);
        }
    }
}

static const struct proto_transition *transition(int state, int type)
{
    for (size_t i = 0; i < sizeof(CLIENT_TRANSITIONS) / sizeof(CLIENT_TRANSITIONS[0]); i++)
        if (CLIENT_TRANSITIONS[i].from == state && CLIENT_TRANSITIONS[i].msg == type)
            return &CLIENT_TRANSITIONS[i];
    return NULL;
}

static int names_slot(const struct proto_msg *m, uint32_t slot)
{
    const msgpack_object_array *a = &m->f[F_BATCH_MEMBERS]->via.array;
    for (uint32_t i = 0; i < a->size; i++)
        if (a->ptr[i].via.u64 == slot)
            return 1;
    return a->size == 0;
}

/* The message in every state, with a slot it names (if any) and one it does not. */
static void check_states(const struct proto_msg *m)
{
    uint32_t slots[2] = {0, 0};
    if (m->type == PMSG_BATCH && m->f[F_BATCH_MEMBERS]->via.array.size) {
        slots[0] = (uint32_t)m->f[F_BATCH_MEMBERS]->via.array.ptr[0].via.u64;
        while (names_slot(m, slots[1]))
            slots[1]++;
    }
    for (int state = ST_NEW; state <= ST_CLOSED; state++) {
        for (int k = 0; k < 2; k++) {
            struct proto_conn p;
            char why[256] = "";
            proto_conn_init(&p, 0);
            p.state = state;            /* a connection that just heard and spoke */
            p.slot = slots[k];
            p.last_recv = p.last_sent = NOW - 1;
            const struct proto_transition *t = transition(state, m->type);
            int want = t && (m->type != PMSG_BATCH || names_slot(m, p.slot));
            int r = proto_receive(&p, m, NOW, why, sizeof(why));
            CHECK((r >= 0) == want, "%s while %s: %s", SCHEMAS[m->type].type,
                  STATE_NAMES[state], r < 0 ? why : "taken");
            if (r == PROTO_RX_LOST) {   /* a broker that does not know us; no reconnecting */
                CHECK(p.state == ST_CLOSED && state == ST_ATTACHED, "lost while %s",
                      STATE_NAMES[state]);
                continue;
            }
            CHECK(r <= PROTO_RX_OK, "%s while %s: %d", SCHEMAS[m->type].type,
                  STATE_NAMES[state], r);
            CHECK(p.state == (want ? t->to : state), "%s while %s: now %s",
                  SCHEMAS[m->type].type, STATE_NAMES[state], STATE_NAMES[p.state]);
            if (!want)
                continue;
            CHECK(p.last_recv == NOW && p.heartbeat > 0 && p.liveness > 0,
                  "heartbeat %lld, liveness %lld", (long long)p.heartbeat,
                  (long long)p.liveness);
            int64_t at = proto_timer(&p);
            CHECK(at > NOW, "timer at %lld", (long long)at);
            if (at == INT64_MAX)
                continue;
            msgpack_sbuffer sb;
            msgpack_sbuffer_init(&sb);
            int h = proto_handle_timer(&p, &sb, at);
            CHECK(h == PROTO_TIMER_SENT || h == PROTO_TIMER_LOST, "timer: %d", h);
            msgpack_sbuffer_destroy(&sb);
        }
    }
}

static void pack(msgpack_sbuffer *sb, const msgpack_object *o)
{
    msgpack_packer pk;
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    CHECK(msgpack_pack_object(&pk, *o) == 0, "packing again");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int report = -1;
    if (report < 0)
        report = getenv("PKTIPC_FUZZ_REPORT") != NULL;
    struct proto_msg m, again;
    char why[256], why2[256];
    proto_msg_init(&m);
    proto_msg_init(&again);
    int r = decode(&m, data, size, why, sizeof(why));
    CHECK(decode(&again, data, size, why2, sizeof(why2)) == r && again.type == m.type &&
          strcmp(why, why2) == 0, "another verdict the second time: '%s', '%s'", why, why2);
    if (r == 0) {
        check_fields(&m);
        /* Packed again, it decodes alike, and packs to the same bytes (NaN
         * among them: msgpack_object_equal would not say so). */
        msgpack_sbuffer sb, sb2;
        pack(&sb, &m.up.data);
        CHECK(decode(&again, sb.data, sb.size, why2, sizeof(why2)) == 0 && again.type == m.type,
              "packed again, %s is refused: %s", SCHEMAS[m.type].type, why2);
        for (unsigned f = 0; f < PROTO_MAX_FIELDS; f++)
            CHECK(!m.f[f] == !again.f[f], "%s: field %u lost once packed again",
                  SCHEMAS[m.type].type, f);
        pack(&sb2, &again.up.data);
        CHECK(sb.size == sb2.size && memcmp(sb.data, sb2.data, sb.size) == 0,
              "%s: other bytes once packed twice", SCHEMAS[m.type].type);
        msgpack_sbuffer_destroy(&sb);
        msgpack_sbuffer_destroy(&sb2);
        check_states(&m);
    }
    if (report)
        printf("%016llx %s %s\n", (unsigned long long)input_id(data, size), r ? "refused" : "ok",
               r ? why : SCHEMAS[m.type].type);
    proto_msg_free(&m);
    proto_msg_free(&again);
    return 0;
}
