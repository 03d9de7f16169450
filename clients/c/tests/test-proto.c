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
    kv_u64("v", 1);
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

static void welcome(uint64_t hb, uint64_t live)
{
    head("welcome", 8);
    kv_str("shm", "/pktipc.x.0000000000000001");
    kv_u64("epoch", 1);
    kv_u64("layout", 1);
    kv_u64("slot", 0);
    kv_u64("credit", 8);
    kv_str("policy", "block");
    kv_u64("heartbeat_ms", hb);
    kv_u64("liveness_ms", live);
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

    head("batch", 4);
    kv_u64("seq", UINT64_MAX);
    kv_u64("slab", 3);
    kv_u64("gen", 7);
    kv_u64("n", 100);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(m.type, PMSG_BATCH);
    CHECK(proto_u64(&m, F_BATCH_SEQ) == UINT64_MAX);
    CHECK_EQ(proto_u64(&m, F_BATCH_N), 100);

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

    head("heartbeat", 0);
    msgpack_sbuffer_write(&sb, "\xc0", 1);      /* trailing bytes */
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "malformed", 9) == 0);

    begin(1);                                   /* no version */
    kv_str("t", "heartbeat");
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "version", 7) == 0);

    begin(2);                                   /* another version */
    kv_str("t", "heartbeat");
    kv_u64("v", 2);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strncmp(why, "version", 7) == 0);

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

    head("gap", 2);                             /* repeated field */
    kv_u64("from", 1);
    kv_u64("from", 2);
    CHECK_EQ(decode(&m, why), -1);

    head("batch", 4);                           /* slab beyond u32 */
    kv_u64("seq", 1);
    kv_u64("slab", UINT64_C(1) << 32);
    kv_u64("gen", 1);
    kv_u64("n", 1);
    CHECK_EQ(decode(&m, why), -1);
    CHECK(strstr(why, "batch.slab") != NULL);

    head("batch", 4);                           /* n of 0 */
    kv_u64("seq", 1);
    kv_u64("slab", 1);
    kv_u64("gen", 1);
    kv_u64("n", 0);
    CHECK_EQ(decode(&m, why), -1);

    head("batch", 4);                           /* negative, float, string, nil */
    str("seq");
    msgpack_pack_int64(&pk, -1);
    str("slab");
    msgpack_pack_double(&pk, 1.0);
    kv_str("gen", "1");
    str("n");
    msgpack_pack_nil(&pk);
    CHECK_EQ(decode(&m, why), -1);

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
    proto_conn_init(&p);

    head("batch", 4);
    kv_u64("seq", 1);
    kv_u64("slab", 1);
    kv_u64("gen", 1);
    kv_u64("n", 1);
    CHECK_EQ(decode(&m, why), 0);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), -1);   /* before HELLO */
    CHECK(strstr(why, "batch while new") != NULL);

    CHECK_EQ(proto_release(&p, &out, NOW, (uint64_t[]){1}, 1), -1);
    CHECK_EQ(proto_hello(&p, &out, NOW, "ids", NULL, "drop", 0, 42), 0);
    CHECK_EQ(proto_hello(&p, &out, NOW, "ids", NULL, "drop", 0, 42), -1);
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
    CHECK_EQ(p.state, ST_CLOSED);

    /* A broker's interval longer than a third of its liveness is shortened. */
    proto_conn_init(&p);
    proto_hello(&p, &out, NOW, "ids", NULL, NULL, 0, 1);
    welcome(20000, 30000);
    decode(&m, why);
    proto_receive(&p, &m, NOW, why, sizeof(why));
    CHECK_EQ(p.heartbeat, 10000 * INT64_C(1000000));

    welcome(100, 300);                          /* WELCOME again: unexpected */
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), -1);

    head("eos", 1);
    str("error");
    msgpack_pack_nil(&pk);
    decode(&m, why);
    CHECK_EQ(proto_receive(&p, &m, NOW, why, sizeof(why)), 0);
    CHECK_EQ(p.state, ST_ENDED);
    CHECK_EQ(proto_timer(&p), INT64_MAX);
    CHECK_EQ(proto_release(&p, &out, NOW, (uint64_t[]){1, 2}, 2), 0);  /* still allowed */
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_RELEASE);
    CHECK_EQ(m.f[F_RELEASE_SEQS]->via.array.size, 2);
    CHECK_EQ(proto_bye(&p, &out, NOW), 0);
    CHECK_EQ(proto_bye(&p, &out, NOW), -1);

    /* HELLO with every field, read back by the same rules the broker keeps. */
    proto_conn_init(&p);
    CHECK_EQ(proto_hello(&p, &out, NOW, "ids-1", "ids", "block", 4096, UINT32_MAX), 0);
    CHECK_EQ(proto_decode(&m, out.data, out.size, why, sizeof(why)), 0);
    CHECK_EQ(m.type, PMSG_HELLO);
    CHECK_EQ(proto_u64(&m, F_HELLO_CREDIT), 4096);
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
        if (round % 2)
            welcome(1000, 30000);
        else {
            head("batch", 4);
            kv_u64("seq", x);
            kv_u64("slab", 1);
            kv_u64("gen", 2);
            kv_u64("n", 3);
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
        RUN(test_names);
        RUN(test_fuzz);
    }
    msgpack_sbuffer_destroy(&sb);
    return r;
}
