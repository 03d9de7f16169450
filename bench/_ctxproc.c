/*
 * A sending client in C, run by bench.tx: a capture file's frames (classic
 * pcap, read into memory first) out of interface 0 of broker SERVER, LOOPS
 * times, as fast as they go, through libpktipc's TX area
 * (pktipc_tx_alloc, a memcpy, pktipc_tx_send; pktipc_tx_flush at the end).
 *
 *     _ctxproc SERVER NAME FILE LOOPS
 *
 * Prints "submitted N sent N bytes B secs S refused R", S from the first frame
 * allocated to the broker's answer for the last.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pktipc.h>

struct rec { uint32_t len; const uint8_t *data; };

static double mono(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static struct rec *read_pcap(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)size);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        perror("read");
        exit(1);
    }
    fclose(f);
    uint32_t magic;
    memcpy(&magic, buf, 4);
    int swap = magic == 0xd4c3b2a1 || magic == 0x4d3cb2a1;
    size_t cap = 1024, k = 0;
    struct rec *r = malloc(cap * sizeof(*r));
    for (long off = 24; off + 16 <= size;) {
        uint32_t len;
        memcpy(&len, buf + off + 8, 4);
        if (swap)
            len = __builtin_bswap32(len);
        if (off + 16 + (long)len > size)
            break;
        if (k == cap)
            r = realloc(r, (cap *= 2) * sizeof(*r));
        r[k].len = len;
        r[k++].data = buf + off + 16;
        off += 16 + (long)len;
    }
    *n = k;
    return r;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: _ctxproc SERVER NAME FILE LOOPS\n");
        return 2;
    }
    size_t n;
    struct rec *r = read_pcap(argv[3], &n);
    long loops = atol(argv[4]);
    char errbuf[PKTIPC_ERRBUF_SIZE];
    struct pktipc_opts o = {.sz = sizeof(o), .server = argv[1], .name = argv[2],
                            .timeout_ms = -1, .reconnect_ms = 0, .errbuf = errbuf,
                            .tx_frames = 4096};
    pktipc_client *c;
    if (pktipc_open(&o, &c) < 0) {
        fprintf(stderr, "open: %s\n", errbuf);
        return 1;
    }
    uint8_t *f;
    if (pktipc_tx_alloc(c, r[0].len, 0, -1, &f) < 0) {      /* the area offered */
        fprintf(stderr, "alloc: %s\n", pktipc_geterr(c));
        return 1;
    }
    unsigned long long sent = 0, bytes = 0;
    double t0 = mono();
    for (long l = 0; l < loops; l++)
        for (size_t i = 0; i < n; i++) {
            int e = pktipc_tx_alloc(c, r[i].len, 0, -1, &f);
            if (e < 0) {
                fprintf(stderr, "alloc: %s\n", pktipc_geterr(c));
                return 1;
            }
            memcpy(f, r[i].data, r[i].len);
            if (pktipc_tx_send(c, f, r[i].len) < 0)
                return 1;
            sent++;
            bytes += r[i].len;
        }
    int e = pktipc_tx_flush(c, -1);
    double secs = mono() - t0;
    struct pktipc_stats st;
    pktipc_stats(c, &st, sizeof(st));
    if (e < 0 && e != -PKTIPC_EREFUSED) {
        fprintf(stderr, "flush: %s\n", pktipc_geterr(c));
        return 1;
    }
    printf("submitted %llu sent %llu bytes %llu secs %.6f refused %llu\n", sent,
           (unsigned long long)st.tx_sent, bytes, secs, (unsigned long long)st.tx_refused);
    pktipc_close(c);
    return 0;
}
