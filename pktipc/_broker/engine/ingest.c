/* Broker-side ingest: capture sources into slabs, one call per chunk. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <pcap/pcap.h>

#include "pktipc_linktype.h"
#include "pktipc_shm.h"
#include "fill.h"        /* with ingest.h and flowhash.h */
#include "sigbus.h"

/* A classic pcap file in the host's byte order is read from a private
 * read-only mapping, record by record, instead of through libpcap's two
 * fread()s per packet (most of the broker's time with small frames).
 * libpcap still opens and checks the file, and takes over, from the same
 * record, at anything out of the ordinary (a record longer than the snap
 * length, a truncated record), so that what is read, and every error, is
 * libpcap's own. */
struct mapped {
    const uint8_t *base;
    size_t len;                /* what is read of it: the mapping, or less once the file shrank */
    size_t size;               /* the mapping */
    size_t off;                /* the next record */
    size_t rec;                /* the last record read */
    struct pcap_pkthdr hdr;
};

struct pkb_src {
    pcap_t *p;
    struct pcap_pkthdr *hdr;   /* pending packet: valid until the next read */
    const u_char *data;
    int64_t ts;                /* pending packet's time, ns */
    int pending;
    int done;                  /* 1: end of file, 2: error */
    uint32_t ns_per_tick;      /* classic pcap: 1000 (microsecond files) or 1; pcapng: 0 */
    uint64_t read;             /* packets read, the pending one included */
    struct mapped *map;        /* NULL: every record through libpcap */
    size_t mapped_to;          /* the end of the last record read from the mapping */
    char err[PKB_ERRBUF_SIZE];
};

#define PCAP_MAGIC_US 0xa1b2c3d4
#define PCAP_MAGIC_NS 0xa1b23c4d
#define PCAPNG_MAGIC 0x0a0d0d0a
#define LINKTYPE_USB_LINUX 189            /* libpcap rewrites these records' lengths */
#define LINKTYPE_USB_LINUX_MMAPPED 220

static __thread unsigned long bus_caught;     /* mapped reads a SIGBUS ended */

static struct mapped *map_file(pcap_t *p, uint32_t magic)
{
    int dlt = pcap_datalink(p);
    /* Older minor versions have records whose lengths libpcap fixes up. */
    if ((magic != PCAP_MAGIC_US && magic != PCAP_MAGIC_NS) || pcap_major_version(p) != 2 ||
        pcap_minor_version(p) != 4 || dlt == LINKTYPE_USB_LINUX ||
        dlt == LINKTYPE_USB_LINUX_MMAPPED)
        return NULL;
    FILE *fp = pcap_file(p);
    struct stat st;
    if (fstat(fileno(fp), &st) < 0 || !S_ISREG(st.st_mode) || st.st_size < 24)
        return NULL;
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fileno(fp), 0);
    if (base == MAP_FAILED)
        return NULL;
    madvise(base, (size_t)st.st_size, MADV_SEQUENTIAL);
    pkb_bus_install();
    struct mapped *m = calloc(1, sizeof(*m));
    if (!m) {
        munmap(base, (size_t)st.st_size);
        return NULL;
    }
    m->base = base;
    m->len = m->size = (size_t)st.st_size;
    m->off = 24;
    return m;
}

static void unmap(pkb_src *s)
{
    munmap((void *)s->map->base, s->map->size);
    free(s->map);
    s->map = NULL;
}

/* From the record at `off` on, libpcap reads the file: -1, or -2 if it
 * cannot seek there. */
static int hand_over(pkb_src *s, size_t off)
{
    if (s->map)
        unmap(s);
    return fseek(pcap_file(s->p), (long)off, SEEK_SET) == 0 ? -1 : -2;
}

/* The next record from the mapping: 1 read, -1 when libpcap must read it
 * (libpcap's reader is then where this record starts, and the mapping is
 * gone): at the end of the mapping too, so that what a file grew by since it
 * was mapped is read as well. */
static int mapped_next(pkb_src *s)
{
    struct mapped *m = s->map;
    if (m->len - m->off >= 16) {
        uint32_t sec, frac, caplen, len;
        const uint8_t *r = m->base + m->off;
        memcpy(&sec, r, 4);
        memcpy(&frac, r + 4, 4);
        memcpy(&caplen, r + 8, 4);
        memcpy(&len, r + 12, 4);
        if (caplen <= (uint32_t)pcap_snapshot(s->p) && m->len - m->off - 16 >= caplen) {
            /* As libpcap would hand them over (see ts_of). */
            m->hdr.ts.tv_sec = sec;
            m->hdr.ts.tv_usec = (suseconds_t)((uint64_t)frac * s->ns_per_tick);
            m->hdr.caplen = caplen;
            m->hdr.len = len;
            s->hdr = &m->hdr;
            s->data = r + 16;
            m->rec = m->off;
            m->off += 16 + (size_t)caplen;
            s->mapped_to = m->off;
            return 1;
        }
    }
    return hand_over(s, m->off);
}

pkb_src *pkb_src_open_file(const char *path, char *errbuf)
{
    char pcap_err[PCAP_ERRBUF_SIZE] = "";
    pcap_t *p = pcap_open_offline_with_tstamp_precision(path, PCAP_TSTAMP_PRECISION_NANO, pcap_err);
    if (!p) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "%s", pcap_err);
        return NULL;
    }
    pkb_src *s = calloc(1, sizeof(*s));
    if (!s) {
        pcap_close(p);
        snprintf(errbuf, PKB_ERRBUF_SIZE, "out of memory");
        return NULL;
    }
    s->p = p;
    /* A link type is 16 bits in both formats and in a descriptor; libpcap
     * 1.10 hands over the reserved bits of a classic header's field too. */
    if (pkb_src_linktype(s) > 0xffff) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "link type %#x is not a 16-bit LINKTYPE_ value "
                 "(reserved bits of the file header's link type field are set)",
                 (unsigned)pkb_src_linktype(s));
        pkb_src_close(s);
        return NULL;
    }
    /* The first four bytes tell the format, and a classic file's clock. */
    uint32_t magic = 0;
    FILE *fp = pcap_file(p);
    if (!fp || pread(fileno(fp), &magic, 4, 0) != 4) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "not a regular file (pipes cannot be served)");
        pkb_src_close(s);
        return NULL;
    }
    if (magic != PCAPNG_MAGIC)
        s->ns_per_tick = magic == PCAP_MAGIC_NS || magic == __builtin_bswap32(PCAP_MAGIC_NS)
                             ? 1 : 1000;
    s->map = map_file(p, magic);
    return s;
}

int pkb_src_linktype(const pkb_src *s)
{
    return pktipc_linktype_of_dlt(pcap_datalink(s->p));
}
uint32_t pkb_src_snaplen(const pkb_src *s) { return (uint32_t)pcap_snapshot(s->p); }
uint32_t pkb_src_ts_resolution(const pkb_src *s)
{
    return s->ns_per_tick ? 1000000000 / s->ns_per_tick : 0;
}
const char *pkb_src_error(const pkb_src *s) { return s->err; }
uint32_t pkb_src_pending_caplen(const pkb_src *s) { return s->pending ? s->hdr->caplen : 0; }

void pkb_src_close(pkb_src *s)
{
    if (!s)
        return;
    if (s->map)
        unmap(s);
    pcap_close(s->p);
    free(s);
}

/* A packet's time in ns since 1970, as the format defines it; 0, or -1
 * when an int64 of nanoseconds cannot hold it (past the year 2262).
 *
 * A classic pcap record's seconds and sub-second ticks are unsigned 32-bit
 * counts (the IETF pcap draft; libpcap from 2024 on). libpcap 1.10 reads
 * both as signed and, asked for nanoseconds, multiplies microseconds by 1000
 * before we see them: the low 32 bits of each give the file's counts back
 * whichever way libpcap read them. Their sum, at most 2^32 s + 2^32 us, fits.
 * pcapng times are 64-bit tick counts that libpcap turns into seconds and
 * nanoseconds itself. */
static int ts_of(const pkb_src *s, const struct pcap_pkthdr *h, int64_t *ts)
{
    if (s->ns_per_tick) {
        uint64_t sec = (uint32_t)h->ts.tv_sec;
        uint64_t frac = (uint32_t)(h->ts.tv_usec / s->ns_per_tick);
        *ts = (int64_t)(sec * 1000000000 + frac * s->ns_per_tick);
        return 0;
    }
    int64_t ns;
    if (h->ts.tv_sec < 0 || h->ts.tv_usec < 0 ||
        __builtin_mul_overflow((int64_t)h->ts.tv_sec, INT64_C(1000000000), &ns) ||
        __builtin_add_overflow(ns, (int64_t)h->ts.tv_usec, ts))
        return -1;
    return 0;
}

/* Reads the next record into s->hdr and s->data: 1, or 0 with s->done set. */
static int src_read(pkb_src *s)
{
    if (s->map) {
        int m = mapped_next(s);
        if (m == 1)
            return 1;
        if (m == -2) {
            s->done = 2;
            snprintf(s->err, sizeof(s->err), "cannot seek in the file");
            return 0;
        }
    }
    int r = pcap_next_ex(s->p, &s->hdr, &s->data);
    if (r == 1)
        return 1;
    if (r == PCAP_ERROR_BREAK) {
        s->done = 1;
    } else {
        s->done = 2;
        snprintf(s->err, sizeof(s->err), "%s", pcap_geterr(s->p));
    }
    return 0;
}

/* Makes the next packet pending; 0 when there is none. */
static int src_advance(pkb_src *s)
{
    if (s->pending)
        return 1;
    if (s->done || !src_read(s))
        return 0;
    s->read++;
    if (ts_of(s, s->hdr, &s->ts) < 0) {
        s->done = 2;
        snprintf(s->err, sizeof(s->err), "packet %llu: its time, %lld s after 1970, is past "
                 "the year 2262, beyond nanosecond timestamps", (unsigned long long)s->read,
                 (long long)s->hdr->ts.tv_sec);
        return 0;
    }
    s->pending = 1;
    return 1;
}

void pkb_fill_begin(struct pkb_fill *f, uint8_t *slab, uint32_t slab_size, uint32_t iface)
{
    memset(f, 0, sizeof(*f));
    f->slab = slab;
    f->slab_size = slab_size;
    f->data_low = slab_size;
    f->iface = iface;
}

static int fill(pkb_src *s, struct pkb_fill *f, int64_t ts_limit, uint32_t max_pkts)
{
    const uint16_t linktype = (uint16_t)pkb_src_linktype(s);

    while (f->count < max_pkts) {
        if (!src_advance(s))
            return s->done == 1 ? PKB_FILL_EOF : PKB_FILL_ERROR;
        const struct pcap_pkthdr *h = s->hdr;
        if (s->ts > ts_limit)
            return PKB_FILL_LIMIT;
        uint32_t off = pkb_fill_room(f, h->caplen);
        if (!off)
            return f->count ? PKB_FILL_FULL : PKB_FILL_TOOBIG;
        /* Make sure what was filled is in *f before the copy, which may
         * fault on a truncated file: the slab then ends where it stood. */
        __asm__ __volatile__("" ::: "memory");
        memcpy(f->slab + off, s->data, h->caplen);
        pkb_fill_add(f, off, s->ts, h->caplen, h->len, linktype, 0,
                     h->caplen < h->len ? PKTIPC_F_TRUNCATED : 0);
        s->pending = 0;
    }
    return PKB_FILL_FULL;
}

/* The file's size now; SIZE_MAX if it cannot be told. */
static size_t file_size(pkb_src *s)
{
    struct stat st;
    return fstat(fileno(pcap_file(s->p)), &st) == 0 ? (size_t)st.st_size : SIZE_MAX;
}

/* The file shrank (truncated in place) under the mapping, to `size`: what
 * this fill took from records beyond it is taken back, and libpcap reads
 * on from the first of them, so that the stream ends as libpcap's own read
 * of the truncated file does. `count0` packets were in the slab and the
 * records from `first` on were this fill's. */
static void shrank(pkb_src *s, struct pkb_fill *f, uint32_t count0, size_t first, size_t size)
{
    const struct pktipc_pkt *d = (const struct pktipc_pkt *)f->slab;
    size_t off = first;
    uint32_t i = count0;
    for (; i < f->count && off + 16 + d[i].caplen <= size; i++)
        off += 16 + d[i].caplen;
    for (uint32_t j = i; j < f->count; j++)
        f->bytes -= d[j].caplen;
    if (i < f->count) {
        f->data_low = i ? d[i - 1].data_off : f->slab_size;
        f->last_ts_ns = i ? d[i - 1].ts_ns : 0;
        f->first_ts_ns = i ? f->first_ts_ns : 0;
        f->count = i;
    }
    s->pending = 0;
    s->mapped_to = 0;
    s->done = 0;                /* libpcap reads on, to its own end */
    if (hand_over(s, off) == -2) {
        s->done = 2;
        snprintf(s->err, sizeof(s->err), "cannot seek in the file");
    }
}

/* fill() from the mapping under the SIGBUS guard (sigbus.h): a page past the file's
 * new end, truncated meanwhile, ends the mapped read where it stood. */
static int guarded_fill(pkb_src *s, struct pkb_fill *f, int64_t ts_limit, uint32_t max_pkts,
                        uint32_t count0, size_t first)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0)) {
        pkb_bus_guard = NULL;
        bus_caught++;
        shrank(s, f, count0, first, file_size(s));
        return fill(s, f, ts_limit, max_pkts);
    }
    pkb_bus_guard = &jb;
    int r = fill(s, f, ts_limit, max_pkts);
    pkb_bus_guard = NULL;
    return r;
}

/* After a mapped fill that returned r: if the file shrank while it read,
 * what it read past the end (of the last page: zeros) is not the file's. */
static int settle(pkb_src *s, struct pkb_fill *f, int r, uint32_t count0, size_t first,
                  int64_t ts_limit, uint32_t max_pkts)
{
    size_t size = file_size(s);
    if (size >= s->mapped_to)
        return r;
    shrank(s, f, count0, first, size);
    return fill(s, f, ts_limit, max_pkts);
}

int pkb_src_fill(pkb_src *s, struct pkb_fill *f, int64_t ts_limit, uint32_t max_pkts)
{
    if (!s->map)
        return fill(s, f, ts_limit, max_pkts);
    /* Records past the file's end, as it is now, are libpcap's to read. */
    struct mapped *m = s->map;
    size_t size = file_size(s);
    uint32_t count0 = f->count;
    size_t first = s->pending ? m->rec : m->off;
    if (size < m->off) {
        shrank(s, f, count0, first, size);
        return fill(s, f, ts_limit, max_pkts);
    }
    if (size < m->len)
        m->len = size;
    return settle(s, f, guarded_fill(s, f, ts_limit, max_pkts, count0, first), count0, first,
                  ts_limit, max_pkts);
}

int64_t pkb_src_peek_ts(pkb_src *s)
{
    if (s->map && !s->pending) {
        /* Read into a slab of none, so that a file shrunk meanwhile is
         * handled as pkb_src_fill handles it. */
        struct pkb_fill none;
        pkb_fill_begin(&none, NULL, 0, 0);
        pkb_src_fill(s, &none, INT64_MIN, 1);
    }
    return src_advance(s) ? s->ts : INT64_MAX;
}

void pkb_pkts_hash(const uint8_t *slab, struct pktipc_pkt *pkts, uint32_t n, uint32_t hash_opts)
{
    for (uint32_t i = 0; i < n; i++)
        if (pkts[i].flags & PKTIPC_F_NO_HASH)
            pkts[i].hash = pkb_flow_hash(slab + pkts[i].data_off, pkts[i].caplen,
                                         pkts[i].linktype, hash_opts);
}

void pkb_fill_hash(struct pkb_fill *f)
{
    struct pktipc_pkt *pkts = (struct pktipc_pkt *)f->slab;
    if (!f->no_hash)
        return;
    pkb_pkts_hash(f->slab, pkts, f->count, f->hash_opts);
    for (uint32_t i = 0; i < f->count; i++)
        pkts[i].flags &= (uint16_t)~PKTIPC_F_NO_HASH;
    f->no_hash = 0;
}

void pkb_batch_publish(struct pktipc_batch_rec *rec, uint32_t slab, uint32_t gen,
                          uint64_t seq, const struct pkb_fill *f,
                          uint64_t kernel_drops, uint64_t broker_drops)
{
    rec->slab = slab;
    rec->gen = gen;
    rec->count = f->count;
    rec->data_bytes = f->slab_size - f->data_low;
    rec->first_ts_ns = f->first_ts_ns;
    rec->last_ts_ns = f->last_ts_ns;
    rec->kernel_drops = kernel_drops;
    rec->broker_drops = broker_drops;
    rec->flags = 0;
    /* Make sure every field above, and the slab's contents, are visible
     * before a reader that polls the table sees the new seq. */
    __atomic_store_n(&rec->seq, seq, __ATOMIC_RELEASE);
}
