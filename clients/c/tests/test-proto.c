/*
 * The protocol module alone: every frame a broker may send is decoded and
 * checked as pktipc/_protocol.py does, anything else refused with a reason,
 * never a crash (a fuzz loop runs under the sanitizers and valgrind); the
 * state machine's transitions and timers; the name rule.
 *
 *     test-proto            the tests
 *     test-proto --verdicts reads frames (u32 length, bytes) on stdin and
 *                           prints "ok TYPE" or "refused" for each: the
 *                           Python tests compare these with _protocol.decode.
 */
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "proto.h"

#define NOW INT64_C(1000000000000)

static msgpack_sbuffer sb;
static msgpack_packer pk;

static void begin(size_t n)
{
    msgpack_sbuffer_clear(&sb);
    msgpack_pack_map(&pk, n);
}

static void str(const char *s)
{
    msgpack_pack_str_with_body(&pk, s, strlen(s));
}

static void kv_str(const char *k, const char *v)
{
    str(k);
    str(v);
}

static void kv_u64(const char *k, uint64_t v)
{
    str(k);
    msgpack_pack_uint64(&pk, v);
}

static void head(const char *type, size_t nfields)
{
    begin(2 + nfields);
    kv_str("t", type);
    kv_u64("v", PROTO_VERSION);
}

/* BATCH's fields after seq, slab, gen and n: members[0..nmembers), mask
 * (NULL: nil) of masklen bytes. */
static void share(const uint32_t *members, uint32_t nmembers, const char *mask, size_t masklen)
{
    str("members");
    msgpack_pack_array(&pk, nmembers);
    for (uint32_t i = 0; i < nmembers; i++)
        msgpack_pack_uint32(&pk, members[i]);
    str("mask");
    if (mask) {
        msgpack_pack_bin(&pk, masklen);
        msgpack_pack_bin_body(&pk, mask, masklen);
    } else {
        msgpack_pack_nil(&pk);
    }
}

static void batch(uint64_t seq, uint64_t n)
{
    head("batch", 6);
    kv_u64("seq", seq);
    kv_u64("slab", 1);
    kv_u64("gen", 1);
    kv_u64("n", n);
}

static int decode(struct proto_msg *m, char *why)
{
    return proto_decode(m, sb.data, sb.size, why, 200);
}

static int refused_raw(const void *p, size_t n)
{
    struct proto_msg m;
    char why[200];
    proto_msg_init(&m);
    int r = proto_decode(&m, p, n, why, sizeof(why));
    proto_msg_free(&m);
    return r == -1 && why[0];
}

static void welcome_slot(uint64_t hb, uint64_t live, uint64_t slot)
{
    head("welcome", 10);
    kv_str("shm", "/pktipc.x.0000000000000001");
    kv_u64("epoch", 1);
    kv_u64("layout", 1);
    kv_u64("slot", slot);
    kv_u64("credit", 8);
    kv_str("policy", "block");
    kv_u64("heartbeat_ms", hb);
    kv_u64("liveness_ms", live);
    kv_str("group", "ids");
    kv_str("balance", "round-robin");
}

static void welcome(uint64_t hb, uint64_t live)
{
    welcome_slot(hb, live, 0);
}

static void test_every_broker_message_decodes(void)
{
    struct proto_msg m;
    char why[200];
    uint32_t n;
    proto_msg_init(&m);
    welcome(1000, 30000);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(m.type, PMSG_WELCOME);
    CHECK(memcmp(proto_str(&m, F_WELCOME_SHM, &n), "/pktipc.x.", 10) == 0);
    CHECK_EQ(proto_u64(&m, F_WELCOME_CREDIT), 8);
    CHECK(memcmp(proto_str(&m, F_WELCOME_GROUP, &n), "ids", 3) == 0 && n == 3);
    CHECK(memcmp(proto_str(&m, F_WELCOME_BALANCE, &n), "round-robin", 11) == 0 && n == 11);

    head("batch", 6);
    kv_u64("seq", UINT64_MAX);
    kv_u64("slab", 3);
    kv_u64("gen", 7);
    kv_u64("n", 100);
    share(NULL, 0, NULL, 0);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(m.type, PMSG_BATCH);
    CHECK(proto_u64(&m, F_BATCH_SEQ) == UINT64_MAX);
    CHECK_EQ(proto_u64(&m, F_BATCH_N), 100);
    uint32_t slots[PROTO_MAX_MEMBERS];
    CHECK_EQ(proto_slots(&m, F_BATCH_MEMBERS, slots), 0);
    CHECK(proto_bin(&m, F_BATCH_MASK, &n) == NULL && n == 0);

    /* A share: members, and a mask of one bit per packet. */
    batch(0, 10);
    share((const uint32_t[]){UINT32_MAX, 0, 5}, 3, "\xff\x03", 2);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_slots(&m, F_BATCH_MEMBERS, slots), 3);
    CHECK(slots[0] == UINT32_MAX && slots[1] == 0 && slots[2] == 5);
    const uint8_t *mask = proto_bin(&m, F_BATCH_MASK, &n);
    CHECK(n == 2 && mask[0] == 0xff && mask[1] == 3);
    static uint32_t most[PROTO_MAX_MEMBERS];
    for (uint32_t i = 0; i < PROTO_MAX_MEMBERS; i++)
        most[i] = PROTO_MAX_MEMBERS - i;
    batch(0, 16);
    share(most, PROTO_MAX_MEMBERS, "\x00\x80", 2);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_slots(&m, F_BATCH_MEMBERS, slots), PROTO_MAX_MEMBERS);

    head("gap", 2);
    kv_u64("from", 5);
    kv_u64("to", 9);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_u64(&m, F_GAP_TO), 9);

    head("eos", 1);
    str("error");
    msgpack_pack_nil(&pk);
    CHECK_EQ(decode(&m, why), 0);
    CHECK(proto_str(&m, F_EOS_ERROR, &n) == NULL);

    head("eos", 1);
    kv_str("error", "file truncated");
    CHECK_EQ(decode(&m, why), 0);
    CHECK(memcmp(proto_str(&m, F_EOS_ERROR, &n), "file truncated", n) == 0 && n == 14);

    head("evict", 2);
    kv_str("code", "lease");
    kv_str("text", "held too long");
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(m.type, PMSG_EVICT);

    head("stats_reply", 1);
    str("stats");
    msgpack_pack_map(&pk, 1);
    kv_u64("clients", 3);
    CHECK_EQ(decode(&m, why), 0);

    head("heartbeat", 0);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(m.type, PMSG_HEARTBEAT);
    proto_msg_free(&m);
}

/* Frames Python's decode refuses are refused here, with its error code. */
static void test_bad_frames_are_refused(void)
{
    struct proto_msg m;
    char why[200];
    proto_msg_init(&m);

    static const uint8_t garbage[] = {0xc1, 0x00};
    CHECK(refused_raw(garbage, sizeof(garbage)));
    CHECK(refused_raw("", 0));
    static const uint8_t not_map[] = {0x93, 1, 2, 3};
    CHECK(refused_raw(not_map, sizeof(not_map)));
    /* An array announcing 2^32-1 items in five bytes: refused before
     * msgpack-c would allocate for them. */
    static const uint8_t huge[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    CHECK(refused_raw(huge, sizeof(huge)));
    static const uint8_t huge_map[] = {0x81, 0xa1, 't', 0xdf, 0xff, 0xff, 0xff, 0xff};
    CHECK(refused_raw(huge_map, sizeof(huge_map)));
    static const uint8_t huge_str[] = {0xdb, 0xff, 0xff, 0xff, 0xff, 'a'};
    CHECK(refused_raw(huge_str, sizeof(huge_str)));

    /* Extension types the msgpack spec reserves, but the timestamp (-1):
     * Python's msgpack refuses them anywhere in a frame. */
    head("stats_reply", 1);
    str("stats");
    msgpack_pack_map(&pk, 1);
    str("x");
    msgpack_pack_ext_with_body(&pk, "ab", 2, -5);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "malformed", 9) == 0);
    head("stats_reply", 1);
    str("stats");
    msgpack_pack_map(&pk, 1);
    str("x");
    msgpack_pack_ext_with_body(&pk, "ab", 2, 5);
    CHECK_EQ(decode(&m, why), 0);

    static const uint8_t empty_keys[] = {0x82, 0xa0, 0xa0, 0xa0, 0x02};    /* {"": "", "": 2} */
    CHECK(refused_raw(empty_keys, sizeof(empty_keys)));

    head("heartbeat", 0);
    msgpack_sbuffer_write(&sb, "\xc0", 1);      /* trailing bytes */
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "malformed", 9) == 0);

    begin(1);                                   /* no version */
    kv_str("t", "heartbeat");
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "version", 7) == 0);

    for (int v = 1; v <= 3; v += 2) {            /* the previous version, the next one */
        begin(2);
        kv_str("t", "heartbeat");
        kv_u64("v", (uint64_t)v);
        CHECK_EQ(decode(&m, why), -1);
        CHECK(strncmp(why, "version", 7) == 0);
    }

    begin(2);                                   /* true is not 1 */
    kv_str("t", "heartbeat");
    str("v");
    msgpack_pack_true(&pk);
    CHECK_EQ(decode(&m, why), -1);

    head("nosuch", 0);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "unknown-type", 12) == 0);

    head("gap", 1);                             /* missing field */
    kv_u64("from", 1);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "bad-field", 9) == 0);

    head("gap", 3);                             /* extra field */
    kv_u64("from", 1);
    kv_u64("to", 2);
    kv_u64("by", 2);
    CHECK_EQ(decode(&m, why), -1);

    head("heartbeat", PROTO_MAX_FIELDS);         /* as many fields as a message can have */
    for (int i = 0; i < PROTO_MAX_FIELDS; i++) {
        char k[8];
        snprintf(k, sizeof(k), "k%d", i);
        kv_u64(k, 0);
    }
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "unexpected field") != NULL);
    head("heartbeat", PROTO_MAX_FIELDS + 1);     /* more: refused before keys are compared */
    for (int i = 0; i < PROTO_MAX_FIELDS + 1; i++) {
        char k[8];
        snprintf(k, sizeof(k), "k%d", i);
        kv_u64(k, 0);
    }
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "more than any message has") != NULL);

    head("gap", 2);                             /* repeated field */
    kv_u64("from", 1);
    kv_u64("from", 2);
    CHECK_EQ(decode(&m, why), -1);

    head("batch", 6);                           /* slab beyond u32 */
    kv_u64("seq", 1);
    kv_u64("slab", UINT64_C(1) << 32);
    kv_u64("gen", 1);
    kv_u64("n", 1);
    share(NULL, 0, NULL, 0);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "batch.slab") != NULL);

    batch(1, 0);                                /* n of 0 */
    share(NULL, 0, NULL, 0);
    CHECK_EQ(decode(&m, why), -1);

    head("batch", 6);                           /* negative, float, string, nil */
    str("seq");
    msgpack_pack_int64(&pk, -1);
    str("slab");
    msgpack_pack_double(&pk, 1.0);
    kv_str("gen", "1");
    str("n");
    msgpack_pack_nil(&pk);
    share(NULL, 0, NULL, 0);
    CHECK_EQ(decode(&m, why), -1);

    head("batch", 4);                           /* no members, no mask: version 1's */
    kv_u64("seq", 1);
    kv_u64("slab", 1);
    kv_u64("gen", 1);
    kv_u64("n", 1);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "missing fields") != NULL);

    /* Members: distinct u32s, at most PROTO_MAX_MEMBERS, in a list, never nil. */
    static uint32_t many[PROTO_MAX_MEMBERS + 1];
    for (uint32_t i = 0; i <= PROTO_MAX_MEMBERS; i++)
        many[i] = i;
    batch(1, 1);
    share(many, PROTO_MAX_MEMBERS + 1, NULL, 0);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "batch.members") != NULL);
    many[PROTO_MAX_MEMBERS - 1] = 7;
    batch(1, 1);
    share(many, PROTO_MAX_MEMBERS, NULL, 0);
    CHECK_EQ(decode(&m, why), -1);
    batch(1, 1);
    share((const uint32_t[]){3, 9, 3}, 3, NULL, 0);
    CHECK_EQ(decode(&m, why), -1);
    for (int k = 0; k < 5; k++) {
        batch(1, 1);
        str("members");
        if (k == 0) {
            msgpack_pack_nil(&pk);
        } else if (k == 1) {
            msgpack_pack_uint32(&pk, 1);
        } else {
            msgpack_pack_array(&pk, 2);
            msgpack_pack_uint32(&pk, 1);
            if (k == 2)
                msgpack_pack_uint64(&pk, UINT64_C(1) << 32);
            else if (k == 3)
                msgpack_pack_int32(&pk, -1);
            else
                msgpack_pack_true(&pk);
        }
        str("mask");
        msgpack_pack_nil(&pk);
        CHECK_EQ(decode(&m, why), -1);
        CHECK(strstr(why, "batch.members") != NULL);
    }

    /* The mask: bytes, one bit per packet, none past the last. */
    static const struct {
        uint64_t n;
        const char *mask;
        size_t len;
    } masks[] = {{9, "\xff", 1}, {8, "\xff\x00", 2}, {3, "\x08", 1}, {9, "\x00\x02", 2},
                 {1, "", 0}, {15, "\xff\xff", 2}};
    for (size_t i = 0; i < sizeof(masks) / sizeof(masks[0]); i++) {
        batch(1, masks[i].n);
        share(NULL, 0, masks[i].mask, masks[i].len);
        CHECK_EQ(decode(&m, why), -1);
        CHECK(strcmp(why, "bad-field: batch: fields disagree") == 0);
    }
    batch(1, 3);                                /* the mask as a string */
    str("members");
    msgpack_pack_array(&pk, 0);
    kv_str("mask", "\x07");
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "batch.mask") != NULL);

    welcome(0, 30000);                          /* heartbeat_ms of 0 */
    CHECK_EQ(decode(&m, why), -1);

    head("evict", 2);                           /* code longer than 64 characters */
    kv_str("code", "0123456789012345678901234567890123456789012345678901234567890123456789");
    kv_str("text", "");
    CHECK_EQ(decode(&m, why), -1);

    /* Length counts characters, as Python's len(): 64 two-byte characters pass. */
    char wide[140] = "";
    for (int i = 0; i < 64; i++)
        strcat(wide, "\xc3\xa9");
    head("evict", 2);
    kv_str("code", wide);
    kv_str("text", "");
    CHECK_EQ(decode(&m, why), 0);
    strcat(wide, "\xc3\xa9");
    head("evict", 2);
    kv_str("code", wide);
    kv_str("text", "");
    CHECK_EQ(decode(&m, why), -1);

    static const char *const bad_utf8[] = {"\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                                           "\xff", "\x80"};
    for (size_t i = 0; i < sizeof(bad_utf8) / sizeof(bad_utf8[0]); i++) {
        head("evict", 2);
        kv_str("code", "x");
        kv_str("text", bad_utf8[i]);
        CHECK_EQ(decode(&m, why), -1);
    }

    head("stats_reply", 1);                     /* an int key deep inside */
    str("stats");
    msgpack_pack_map(&pk, 1);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_uint64(&pk, 1);
    CHECK_EQ(decode(&m, why), -1);

    head("stats_reply", 1);                     /* bad UTF-8 deep inside */
    str("stats");
    msgpack_pack_map(&pk, 1);
    kv_str("x", "\xc3");
    CHECK_EQ(decode(&m, why), -1);
    proto_msg_free(&m);
}

static void test_transitions_and_timers(void)
{
    struct proto_conn p;
    struct proto_msg m;
    msgpack_sbuffer out;
    char why[200];
    msgpack_sbuffer_init(&out);
    proto_msg_init(&m);
    proto_conn_init(&p, 0);

    batch(1, 1);
    share(NULL, 0, NULL, 0);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), -1);   /* before HELLO */
    CHECK(strstr(why, "batch while new") != NULL);

    CHECK_EQ(proto_release(&p, &out, NOW, (uint64_t[]){1}, 1), -1);
    CHECK_EQ(proto_hello(&p, &out, NOW, "ids", NULL, "drop", 0, 42, NULL), 0);
    CHECK_EQ(proto_hello(&p, &out, NOW, "ids", NULL, "drop", 0, 42, NULL), -1);
    CHECK_EQ(p.state, ST_HELLO_SENT);
    CHECK_EQ(proto_timer(&p), INT64_MAX);

    welcome(100, 30000);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), 0);
    CHECK_EQ(p.state, ST_ATTACHED);
    CHECK_EQ(p.heartbeat, 100 * 1000000);
    CHECK_EQ(p.liveness, 5 * 100 * 1000000);
    CHECK_EQ(proto_timer(&p), NOW + 100 * 1000000);
    CHECK_EQ(proto_handle_timer(&p, &out, NOW + 99 * 1000000), PROTO_TIMER_NONE);
    CHECK_EQ(proto_handle_timer(&p, &out, NOW + 100 * 1000000), PROTO_TIMER_SENT);
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_HEARTBEAT);
    CHECK_EQ(proto_handle_timer(&p, &out, NOW + 500 * 1000000), PROTO_TIMER_LOST);
    CHECK_EQ(p.state, ST_CLOSED);          /* not reconnecting: the end */

    /* A broker's interval longer than a third of its liveness is shortened. */
    proto_conn_init(&p, 0);
    proto_hello(&p, &out, NOW, "ids", NULL, NULL, 0, 1, NULL);
    welcome_slot(20000, 30000, 3);
    decode(&m, why);
    proto_receive(&p, &m, NOW, why, sizeof(why));
    CHECK_EQ(p.heartbeat, 10000 * INT64_C(1000000));
    CHECK_EQ(p.slot, 3);

    /* A BATCH that names members names ours. */
    batch(1, 1);
    share((const uint32_t[]){1, 2}, 2, NULL, 0);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), -1);
    CHECK(strcmp(why, "bad-field: batch: slot 3 not among members") == 0);
    CHECK_EQ(p.state, ST_ATTACHED);
    batch(1, 1);
    share((const uint32_t[]){1, 3}, 2, "\x01", 1);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), 0);

    welcome(100, 300);                          /* WELCOME again: unexpected */
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), -1);

    head("eos", 1);
    str("error");
    msgpack_pack_nil(&pk);
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), 0);
    CHECK_EQ(p.state, ST_ENDED);
    /* Heartbeats go on until BYE; the broker, free to exit now, is never lost. */
    CHECK_EQ(proto_timer(&p), p.last_sent + p.heartbeat);
    CHECK_EQ(proto_handle_timer(&p, &out, p.last_recv + 10 * p.liveness), PROTO_TIMER_SENT);
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_HEARTBEAT);
    CHECK_EQ(p.state, ST_ENDED);
    CHECK_EQ(proto_mapped(&p, &out, NOW), 0);
    CHECK_EQ(proto_release(&p, &out, NOW, (uint64_t[]){1, 2}, 2), 0);  /* still allowed */
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_RELEASE);
    CHECK_EQ(m.f[F_RELEASE_SEQS]->via.array.size, 2);
    CHECK_EQ(proto_bye(&p, &out, NOW), 0);
    CHECK_EQ(proto_bye(&p, &out, NOW), -1);

    /* HELLO with every field, read back by the same rules the broker keeps. */
    proto_conn_init(&p, 0);
    CHECK_EQ(proto_hello(&p, &out, NOW, "ids-1", "ids", "block", 4096, UINT32_MAX,
                         PROTO_BALANCE_ROUND_ROBIN), 0);
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_HELLO);
    CHECK_EQ(proto_u64(&m, F_HELLO_CREDIT), 4096);
    uint32_t n;
    CHECK(memcmp(proto_str(&m, F_HELLO_BALANCE, &n), "round-robin", 11) == 0 && n == 11);
    proto_msg_free(&m);
    msgpack_sbuffer_destroy(&out);
}

#define MS INT64_C(1000000)

/* An ERROR frame from the broker, in sb. */
static void error_frame(const char *code)
{
    head("error", 2);
    kv_str("code", code);
    kv_str("text", "no");
}

/* A connection attached at NOW (heartbeat 1 s) that finds its broker
 * silent at NOW + 5 s; reconnect: ms. */
static void lose(struct proto_conn *p, int64_t reconnect_ms)
{
    struct proto_msg m;
    msgpack_sbuffer out;
    char why[200];
    msgpack_sbuffer_init(&out);
    proto_msg_init(&m);
    proto_conn_init(p, reconnect_ms * MS);
    CHECK_EQ(proto_hello(p, &out, NOW, "ids", NULL, NULL, 0, 1, NULL), 0);
    welcome(1000, 30000);
    decode(&m, why);
    CHECK_EQ(proto_receive(p, &m, NOW, why, sizeof(why)), PROTO_RX_OK);
    CHECK_EQ(proto_mapped(p, &out, NOW), 0);
    for (int s = 1; s < 5; s++)
        CHECK_EQ(proto_handle_timer(p, &out, NOW + s * 1000 * MS), PROTO_TIMER_SENT);
    CHECK_EQ(proto_timer(p), NOW + 5000 * MS);
    CHECK_EQ(proto_handle_timer(p, &out, NOW + 5000 * MS), PROTO_TIMER_LOST);
    CHECK_EQ(p->state, ST_LOST);
    CHECK(proto_retrying(p));
    CHECK_EQ(p->lost_at, NOW + 5000 * MS);
    proto_msg_free(&m);
    msgpack_sbuffer_destroy(&out);
}

/* As the Python machine's tests: attempts at once, then each given
 * ATTEMPT_MAX, the pause doubling from BACKOFF_MIN to BACKOFF_MAX, until
 * the window ends; a broker in the place welcomes; name-taken is tried
 * again; other refusals end it; not-attached is a lost broker. */
static void test_reconnecting(void)
{
    struct proto_conn p;
    struct proto_msg m;
    msgpack_sbuffer out;
    char why[200];
    msgpack_sbuffer_init(&out);
    proto_msg_init(&m);

    lose(&p, 10000);
    int64_t t = NOW + 5000 * MS, failed_at = 0, pauses[16];
    int attempts = 0, npauses = 0, r;
    for (;;) {
        int64_t due = proto_timer(&p);
        CHECK(due >= t && due != INT64_MAX);
        t = due;
        r = proto_handle_timer(&p, &out, t);
        if (r == PROTO_TIMER_RETRY) {
            if (attempts++ == 0)
                CHECK_EQ(t, NOW + 5000 * MS);
            else if (npauses < 16)
                pauses[npauses++] = t - failed_at;
            CHECK_EQ(proto_hello(&p, &out, t, "ids", NULL, NULL, 0, 1, NULL), 0);
            CHECK_EQ(p.state, ST_HELLO_SENT);
        } else if (r == PROTO_TIMER_ATTEMPT_FAILED) {
            failed_at = t;
            CHECK_EQ(p.state, ST_LOST);
        } else {
            CHECK_EQ(r, PROTO_TIMER_GAVE_UP);
            break;
        }
    }
    CHECK_EQ(t, NOW + 15000 * MS);
    CHECK_EQ(p.state, ST_CLOSED);
    CHECK(!proto_retrying(&p));
    CHECK_EQ(proto_timer(&p), INT64_MAX);
    const int64_t want[6] = {50, 100, 200, 400, 800, 1000};
    for (int i = 0; i < 6; i++)
        CHECK_EQ(pauses[i], want[i] * MS);
    CHECK_EQ(pauses[npauses - 1], PROTO_BACKOFF_MAX_MS * MS);
    CHECK_EQ(p.reconnects, 0);

    /* An attempt ends with the window. */
    lose(&p, 500);
    CHECK_EQ(proto_handle_timer(&p, &out, NOW + 5000 * MS), PROTO_TIMER_RETRY);
    CHECK_EQ(proto_hello(&p, &out, NOW + 5000 * MS, "ids", NULL, NULL, 0, 1, NULL), 0);
    CHECK_EQ(proto_timer(&p), NOW + 5500 * MS);
    CHECK_EQ(proto_handle_timer(&p, &out, NOW + 5500 * MS), PROTO_TIMER_GAVE_UP);

    /* A broker in the place welcomes; counted once the segment is mapped. */
    lose(&p, 10000);
    t = NOW + 5000 * MS;
    CHECK_EQ(proto_handle_timer(&p, &out, t), PROTO_TIMER_RETRY);
    proto_hello(&p, &out, t, "ids", NULL, NULL, 0, 1, NULL);
    welcome_slot(1000, 30000, 2);
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, t + 10 * MS, why, sizeof(why)), PROTO_RX_OK);
    CHECK_EQ(p.state, ST_ATTACHED);
    CHECK_EQ(p.slot, 2);
    CHECK_EQ(p.reconnects, 0);
    CHECK_EQ(proto_mapped(&p, &out, t + 20 * MS), 0);
    CHECK_EQ(p.reconnects, 1);
    CHECK(!p.lost && !proto_retrying(&p));
    CHECK_EQ(proto_timer(&p), t + 1020 * MS);

    /* A name still taken is tried again; another refusal ends it. */
    lose(&p, 10000);
    t = NOW + 5000 * MS;
    proto_handle_timer(&p, &out, t);
    proto_hello(&p, &out, t, "ids", NULL, NULL, 0, 1, NULL);
    error_frame("name-taken");
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, t + 100 * MS, why, sizeof(why)), PROTO_RX_ATTEMPT_FAILED);
    CHECK_EQ(p.state, ST_LOST);
    CHECK_EQ(proto_timer(&p), t + 150 * MS);
    CHECK_EQ(proto_handle_timer(&p, &out, t + 150 * MS), PROTO_TIMER_RETRY);
    proto_hello(&p, &out, t + 150 * MS, "ids", NULL, NULL, 0, 1, NULL);
    error_frame("group-private");
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, t + 200 * MS, why, sizeof(why)), PROTO_RX_OK);
    CHECK_EQ(p.state, ST_CLOSED);

    /* On a first attachment, name-taken is a refusal. */
    proto_conn_init(&p, 10000 * MS);
    proto_hello(&p, &out, NOW, "ids", NULL, NULL, 0, 1, NULL);
    error_frame("name-taken");
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), PROTO_RX_OK);
    CHECK_EQ(p.state, ST_CLOSED);

    /* A broker that does not know us is a lost one. */
    for (int64_t rc = 0; rc <= 10000; rc += 10000) {
        proto_conn_init(&p, rc * MS);
        proto_hello(&p, &out, NOW, "ids", NULL, NULL, 0, 1, NULL);
        welcome(1000, 30000);
        decode(&m, why);
        proto_receive(&p, &m, NOW, why, sizeof(why));
        error_frame("not-attached");
        decode(&m, why);
        CHECK_EQ(proto_receive(&p, &m, NOW + MS, why, sizeof(why)), PROTO_RX_LOST);
        CHECK_EQ(p.state, rc ? ST_LOST : ST_CLOSED);
        CHECK_EQ(proto_timer(&p), rc ? NOW + MS : INT64_MAX);
    }

    /* A WELCOME that cannot be used: BYE, and the next attempt later. */
    lose(&p, 10000);
    t = NOW + 5000 * MS;
    proto_handle_timer(&p, &out, t);
    proto_hello(&p, &out, t, "ids", NULL, NULL, 0, 1, NULL);
    welcome(1000, 30000);
    decode(&m, why);
    proto_receive(&p, &m, t, why, sizeof(why));
    CHECK_EQ(proto_failed(&p, &out, t + 100 * MS), 1);
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_BYE);
    CHECK_EQ(p.state, ST_LOST);
    CHECK_EQ(proto_timer(&p), t + 150 * MS);
    CHECK_EQ(proto_failed(&p, &out, t + 150 * MS), 0);     /* no socket there: no BYE */
    CHECK_EQ(proto_timer(&p), t + 250 * MS);
    /* On a first attachment, it is the end. */
    proto_conn_init(&p, 10000 * MS);
    proto_hello(&p, &out, NOW, "ids", NULL, NULL, 0, 1, NULL);
    welcome(1000, 30000);
    decode(&m, why);
    proto_receive(&p, &m, NOW, why, sizeof(why));
    CHECK_EQ(proto_failed(&p, &out, NOW), 1);
    CHECK_EQ(p.state, ST_CLOSED);

    proto_msg_free(&m);
    msgpack_sbuffer_destroy(&out);
}

static void test_names(void)
{
    CHECK(proto_name_ok("a"));
    CHECK(proto_name_ok("ids-1.worker_2"));
    CHECK(proto_name_ok("012345678901234567890123456789012345678901234567"));
    CHECK(!proto_name_ok("0123456789012345678901234567890123456789012345678"));
    CHECK(!proto_name_ok(""));
    CHECK(!proto_name_ok(NULL));
    CHECK(!proto_name_ok("-a"));
    CHECK(!proto_name_ok(".a"));
    CHECK(!proto_name_ok("a/b"));
    CHECK(!proto_name_ok("a b"));
    CHECK(!proto_name_ok("\xc3\xa9"));
}

/* Mutations of good frames: refused or accepted, never a crash. */
static void test_fuzz(void)
{
    struct proto_msg m;
    char why[200];
    uint64_t x = 88172645463325252u;
    uint8_t buf[256];
    proto_msg_init(&m);
    for (int round = 0; round < 20000; round++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        if (round % 2) {
            welcome(1000, 30000);
        } else {
            batch(x, 11);
            share((const uint32_t[]){(uint32_t)x, 1, 2}, 3, "\x55\x05", 2);
        }
        size_t n = sb.size < sizeof(buf) ? sb.size : sizeof(buf);
        memcpy(buf, sb.data, n);
        for (int k = 0; k < 1 + (int)(x % 4); k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            buf[x % n] = (uint8_t)(x >> 32);
        }
        size_t len = round % 7 ? n : (size_t)(x % (n + 1));
        if (proto_decode(&m, buf, len, why, sizeof(why)) == 0)
            CHECK(m.type >= 0 && m.type < PMSG_COUNT);
    }
    proto_msg_free(&m);
}

static int verdicts(void)
{
    struct proto_msg m;
    char why[200];
    uint32_t len;
    proto_msg_init(&m);
    while (fread(&len, sizeof(len), 1, stdin) == 1) {
        char *frame = malloc(len ? len : 1);
        if (!frame || fread(frame, 1, len, stdin) != len)
            return 1;
        if (proto_decode(&m, frame, len, why, sizeof(why)) == 0)
            printf("ok %s\n", proto_type_name(m.type));
        else
            printf("refused %s\n", why);
        free(frame);
    }
    proto_msg_free(&m);
    return 0;
}

int main(int argc, char **argv)
{
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    int r = 0;
    if (argc > 1 && strcmp(argv[1], "--verdicts") == 0) {
        r = verdicts();
    } else {
        argc = 1;
        RUN(test_every_broker_message_decodes);
        RUN(test_bad_frames_are_refused);
        RUN(test_transitions_and_timers);
        RUN(test_reconnecting);
        RUN(test_names);
        RUN(test_fuzz);
    }
    msgpack_sbuffer_destroy(&sb);
    return r;
}
