/*
 * A capture file truncated in place while the broker reads it from a
 * mapping: the read that meets a page past the new end (SIGBUS), or the
 * zeros past the end in the last page, is ended where it stood, and libpcap
 * reads on from there; what is served is what libpcap reads of the file as
 * it is now. The shrinking is made to happen in the middle of a fill (the
 * check before each fill is passed by), so that both paths are taken.
 *
 *   check-shrink DIR    -> one line per case, "ok" or what differs; exit 0
 */
#include "ingest.c"         /* its statics: the mapped read without its checks */

#include <errno.h>
#include <fcntl.h>

#define RECORDS 3000
#define CAPLEN 1000
#define SLAB (8u << 20)

static void put(int fd, const void *p, size_t n)
{
    if (write(fd, p, n) != (ssize_t)n) {
        perror("write");
        exit(2);
    }
}

static void make_file(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    struct { uint32_t magic; uint16_t maj, min; int32_t zone; uint32_t sig, snap, lt; } h =
        {PCAP_MAGIC_US, 2, 4, 0, 0, 65535, 1};
    put(fd, &h, sizeof(h));
    uint8_t data[CAPLEN];
    for (uint32_t i = 0; i < RECORDS; i++) {
        uint32_t r[4] = {1700000000 + i, i, CAPLEN, CAPLEN};
        memset(data, (int)(i & 0xff), sizeof(data));
        memcpy(data, &i, 4);
        put(fd, r, sizeof(r));
        put(fd, data, sizeof(data));
    }
    close(fd);
}

/* What libpcap alone reads of the file now: packets, and its error. */
static uint32_t libpcap_reads(const char *path, char *err)
{
    char e[PCAP_ERRBUF_SIZE];
    pcap_t *p = pcap_open_offline(path, e);
    struct pcap_pkthdr *h;
    const u_char *d;
    uint32_t n = 0;
    int r;
    while ((r = pcap_next_ex(p, &h, &d)) == 1)
        n++;
    snprintf(err, PKB_ERRBUF_SIZE, "%s", r == PCAP_ERROR_BREAK ? "" : pcap_geterr(p));
    pcap_close(p);
    return n;
}

static int check(const char *dir, const char *what, size_t cut, unsigned long faults)
{
    unsigned long caught = bus_caught;
    char path[4096], want_err[PKB_ERRBUF_SIZE], errbuf[PKB_ERRBUF_SIZE];
    snprintf(path, sizeof(path), "%s/shrink.pcap", dir);
    make_file(path);
    pkb_src *s = pkb_src_open_file(path, errbuf);
    if (!s || !s->map) {
        printf("%s: not mapped\n", what);
        return 1;
    }
    uint8_t *slab = malloc(SLAB);
    struct pkb_fill f;
    pkb_fill_begin(&f, slab, SLAB, 0);
    /* Some packets in, then the file is cut short behind the reader's back. */
    int r = pkb_src_fill(s, &f, INT64_MAX, 100);
    if (truncate(path, (off_t)cut) < 0) {
        perror("truncate");
        exit(2);
    }
    uint32_t count0 = f.count;
    size_t first = s->pending ? s->map->rec : s->map->off;
    r = settle(s, &f, guarded_fill(s, &f, INT64_MAX, UINT32_MAX, count0, first), count0,
               first, INT64_MAX, UINT32_MAX);
    while (r == PKB_FILL_FULL)
        r = pkb_src_fill(s, &f, INT64_MAX, UINT32_MAX);
    uint32_t want = libpcap_reads(path, want_err);
    int bad = 0;
    if (f.count != want || strcmp(pkb_src_error(s), want_err) ||
        r != (*want_err ? PKB_FILL_ERROR : PKB_FILL_EOF)) {
        printf("%s: %u packets (libpcap %u), \"%s\" (libpcap \"%s\")\n", what, f.count, want,
               pkb_src_error(s), want_err);
        bad = 1;
    }
    const struct pktipc_pkt *d = (const struct pktipc_pkt *)slab;
    for (uint32_t i = 0; i < f.count && !bad; i++) {
        uint32_t n;
        memcpy(&n, slab + d[i].data_off, 4);
        if (n != i || d[i].caplen != CAPLEN || d[i].ts_ns != (int64_t)(1700000000 + i) * 1000000000 + i * 1000) {
            printf("%s: packet %u is not the file's\n", what, i);
            bad = 1;
        }
    }
    if (!bad && bus_caught - caught != faults) {
        printf("%s: %lu reads ended by SIGBUS, not %lu\n", what, bus_caught - caught, faults);
        bad = 1;
    }
    if (!bad)
        printf("%s: ok (%u packets, \"%s\")\n", what, f.count, want_err);
    pkb_src_close(s);
    free(slab);
    unlink(path);
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: check-shrink DIR\n");
        return 2;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t rec = 16 + CAPLEN, mid = 24 + 1500 * rec;
    int bad = 0;
    /* At a page boundary inside a record: the next page faults. */
    bad |= check(argv[1], "page", mid / page * page, 1);
    /* Inside a page: zeros up to its end, then a fault. */
    bad |= check(argv[1], "zeros", mid / page * page + 100, 1);
    /* At a record boundary, but the reader is given the page after it. */
    bad |= check(argv[1], "record", mid, 1);
    /* Inside the page the read stops in: zeros only, no fault. */
    bad |= check(argv[1], "tail", 24 + RECORDS * rec - 10, 0);
    return bad;
}
