/*
 * A copy-through-messages broker, the way packet-ipc serves Suricata: every
 * packet serialised (msgpack) and sent over ZeroMQ, in batches, to K
 * consumers. Lossless (an XPUB that blocks instead of dropping), in C, so
 * the comparison is with the transport, not with Python.
 *
 *   msgcopy serve FILE LOOPS K ENDPOINT    read FILE LOOPS times with libpcap,
 *                                          publish batches once K consumers joined
 *   msgcopy consume ENDPOINT               count packets, touch each first byte
 *
 * A batch is one message: a msgpack array of [ts_ns, wirelen, bytes] arrays of
 * at most BATCH_BYTES of frames. An empty message ends the stream. The
 * consumer prints "packets N bytes B seconds S" (from its first batch).
 */
#define _GNU_SOURCE
#include <msgpack.h>
#include <pcap/pcap.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define BATCH_BYTES (1 << 20)
#define MAX_BATCH 16384

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

struct pkt {
    int64_t ts;
    uint32_t caplen, wirelen;
    const uint8_t *data;
};

static void send_batch(void *pub, msgpack_sbuffer *sb, const struct pkt *b, unsigned n)
{
    msgpack_packer pk;
    msgpack_sbuffer_clear(sb);
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, n);
    for (unsigned i = 0; i < n; i++) {
        msgpack_pack_array(&pk, 3);
        msgpack_pack_int64(&pk, b[i].ts);
        msgpack_pack_uint32(&pk, b[i].wirelen);
        msgpack_pack_bin(&pk, b[i].caplen);
        msgpack_pack_bin_body(&pk, b[i].data, b[i].caplen);
    }
    if (zmq_send(pub, sb->data, sb->size, 0) < 0) {
        perror("zmq_send");
        exit(1);
    }
}

static int serve(const char *file, int loops, int k, const char *endpoint)
{
    void *ctx = zmq_ctx_new();
    void *pub = zmq_socket(ctx, ZMQ_XPUB);
    int one = 1, hwm = 64;
    zmq_setsockopt(pub, ZMQ_XPUB_NODROP, &one, sizeof(one));
    zmq_setsockopt(pub, ZMQ_XPUB_VERBOSE, &one, sizeof(one));   /* every subscriber counted */
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    if (zmq_bind(pub, endpoint) < 0) {
        perror("zmq_bind");
        return 1;
    }
    for (int joined = 0; joined < k;) {     /* each SUB's subscription */
        char buf[16];
        if (zmq_recv(pub, buf, sizeof(buf), 0) > 0 && buf[0] == 1)
            joined++;
    }
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    static struct pkt batch[MAX_BATCH];
    uint8_t *copy = malloc(BATCH_BYTES + 65536);
    for (int l = 0; l < loops; l++) {
        char err[PCAP_ERRBUF_SIZE];
        pcap_t *p = pcap_open_offline_with_tstamp_precision(file, PCAP_TSTAMP_PRECISION_NANO, err);
        if (!p) {
            fprintf(stderr, "msgcopy: %s\n", err);
            return 1;
        }
        struct pcap_pkthdr *h;
        const u_char *d;
        unsigned n = 0, used = 0;
        while (pcap_next_ex(p, &h, &d) == 1) {
            if (n == MAX_BATCH || used + h->caplen > BATCH_BYTES) {
                send_batch(pub, &sb, batch, n);
                n = used = 0;
            }
            /* libpcap reuses its buffer: the batch keeps its own copy. */
            memcpy(copy + used, d, h->caplen);
            batch[n++] = (struct pkt){(int64_t)h->ts.tv_sec * 1000000000 + h->ts.tv_usec,
                                      h->caplen, h->len, copy + used};
            used += h->caplen;
        }
        if (n)
            send_batch(pub, &sb, batch, n);
        pcap_close(p);
    }
    zmq_send(pub, "", 0, 0);
    msgpack_sbuffer_destroy(&sb);
    free(copy);
    int linger = -1;
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(pub);
    zmq_ctx_term(ctx);
    return 0;
}

static int consume(const char *endpoint)
{
    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    int hwm = 64;
    zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    if (zmq_connect(sub, endpoint) < 0) {
        perror("zmq_connect");
        return 1;
    }
    uint64_t packets = 0, bytes = 0, touched = 0;
    double start = 0;
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    zmq_msg_t m;
    zmq_msg_init(&m);
    for (;;) {
        if (zmq_msg_recv(&m, sub, 0) < 0) {
            perror("zmq_msg_recv");
            return 1;
        }
        size_t len = zmq_msg_size(&m);
        if (len == 0)
            break;
        if (!start)
            start = now();
        if (msgpack_unpack_next(&u, zmq_msg_data(&m), len, NULL) != MSGPACK_UNPACK_SUCCESS ||
            u.data.type != MSGPACK_OBJECT_ARRAY) {
            fprintf(stderr, "msgcopy: bad batch\n");
            return 1;
        }
        msgpack_object_array *a = &u.data.via.array;
        for (uint32_t i = 0; i < a->size; i++) {
            msgpack_object_bin *bin = &a->ptr[i].via.array.ptr[2].via.bin;
            touched += bin->size ? (uint8_t)bin->ptr[0] : 0;
            bytes += bin->size;
            packets++;
        }
    }
    printf("packets %llu bytes %llu seconds %.6f touched %llu\n", (unsigned long long)packets,
           (unsigned long long)bytes, start ? now() - start : 0.0,
           (unsigned long long)(touched & 1));
    msgpack_unpacked_destroy(&u);
    zmq_msg_close(&m);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "serve"))
        return serve(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5]);
    if (argc == 3 && !strcmp(argv[1], "consume"))
        return consume(argv[2]);
    fprintf(stderr, "usage: msgcopy serve FILE LOOPS K ENDPOINT | msgcopy consume ENDPOINT\n");
    return 2;
}
