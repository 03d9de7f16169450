/*
 * libFuzzer target: the bytes of a capture file through the file ingest
 * (pkb_src_open_file, pkb_src_fill), that is the mapped reader of classic
 * pcap files and libpcap behind it, into slabs. Every slab must hold
 * together (harness.h), and every packet, and the way the file ends, must be
 * what libpcap alone reads from the same bytes: the mapped reader promises
 * exactly that.
 *
 * Run over files (`fuzz-pcap FILE...`), it reads each once; with
 * PKTIPC_FUZZ_REPORT set it prints a line for each on stdout: the input's
 * id (input_id()), whether the file was mapped, its packets, how it ended.
 */
#include "ingest.c"         /* its statics too: whether a file was mapped */

#include <sys/mman.h>

#include "harness.h"

#define KNOB_SLAB(k)     (UINT32_C(4096) << ((k) & 7))   /* 4 KiB .. 512 KiB */
#define KNOB_FEW(k)      ((k) & 0x08)                    /* at most 1..8 packets a slab */
#define KNOB_MAX(k)      (1 + ((k) >> 4 & 7))
#define KNOB_LIMIT(k)    ((k) & 0x80)                    /* a time limit at every fill */
#define MAX_SLAB         (UINT32_C(1) << 24)             /* a larger packet ends the stream */

static int memfd = -1;
static char path[64];

static void put_file(const uint8_t *data, size_t size)
{
    if (memfd < 0) {
        memfd = memfd_create("fuzz-pcap", MFD_CLOEXEC);
        CHECK(memfd >= 0, "memfd_create");
        snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);
    }
    CHECK(ftruncate(memfd, 0) == 0, "ftruncate");
    for (size_t off = 0; off < size;) {
        ssize_t n = pwrite(memfd, data + off, size - off, (off_t)off);
        CHECK(n > 0, "pwrite");
        off += (size_t)n;
    }
}

static void report(const uint8_t *data, size_t size, int mapped, uint64_t packets,
                   const char *end)
{
    static int on = -1;
    if (on < 0)
        on = getenv("PKTIPC_FUZZ_REPORT") != NULL;
    if (on)
        printf("%016llx mapped %d packets %llu end %s\n", (unsigned long long)input_id(data, size),
               mapped, (unsigned long long)packets, end);
}

/* A packet's time as the formats define it, from what libpcap read: for
 * classic pcap the low 32 bits of its seconds and of its sub-second ticks
 * (libpcap 1.10 reads both signed, and scales microseconds to nanoseconds
 * before we see them); -1 where nanoseconds since 1970 in an int64 cannot
 * hold it. */
static int64_t want_ts(const struct pcap_pkthdr *h, uint32_t ns_per_tick)
{
    if (ns_per_tick) {
        uint64_t frac = (uint32_t)(h->ts.tv_usec / ns_per_tick);
        return (int64_t)((uint32_t)h->ts.tv_sec * UINT64_C(1000000000) + frac * ns_per_tick);
    }
    int64_t ns;
    if (h->ts.tv_sec < 0 || h->ts.tv_usec < 0 ||
        __builtin_mul_overflow((int64_t)h->ts.tv_sec, INT64_C(1000000000), &ns) ||
        __builtin_add_overflow(ns, (int64_t)h->ts.tv_usec, &ns))
        return -1;
    return ns;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    put_file(data, size);
    char ref_err[PCAP_ERRBUF_SIZE] = "", err[PKB_ERRBUF_SIZE] = "";
    pcap_t *ref = pcap_open_offline_with_tstamp_precision(path, PCAP_TSTAMP_PRECISION_NANO,
                                                          ref_err);
    pkb_src *s = pkb_src_open_file(path, err);
    if (ref && !s) {
        /* LINKTYPE_ values are 16 bits; libpcap 1.10 also passes on the reserved
         * bits of a classic header's link type field, which pktipc refuses. */
        CHECK(pcap_datalink(ref) > 0xffff && strstr(err, "link type"),
              "libpcap opened it, pktipc: %s", err);
        pcap_close(ref);
        report(data, size, 0, 0, "refused");
        return 0;
    }
    CHECK(!ref == !s, "libpcap: %s; pktipc opened it", ref_err);
    if (!s) {
        report(data, size, 0, 0, "refused");
        return 0;
    }
    CHECK(size >= 4, "a file of %zu bytes opened", size);
    const int mapped = s->map != NULL;

    /* The file's clock, from its first bytes (not from what ingest.c made of them). */
    uint32_t magic;
    memcpy(&magic, data, 4);
    uint32_t ns_per_tick = magic == PCAPNG_MAGIC ? 0
                           : magic == PCAP_MAGIC_NS || magic == __builtin_bswap32(PCAP_MAGIC_NS)
                               ? 1 : 1000;
    CHECK(pkb_src_ts_resolution(s) == (ns_per_tick ? 1000000000 / ns_per_tick : 0),
          "%u ticks a second", pkb_src_ts_resolution(s));
    const uint32_t linktype = (uint32_t)pktipc_linktype_of_dlt(pcap_datalink(ref));
    CHECK((uint32_t)pkb_src_linktype(s) == linktype, "link type %d", pkb_src_linktype(s));
    CHECK(pkb_src_snaplen(s) == (uint32_t)pcap_snapshot(ref), "snap length %u",
          pkb_src_snaplen(s));

    /* Slab size, packets per slab and time limits from the input's last
     * byte: one input always runs alike, and the fuzzer meets every result.
     * A packet too big for a slab waits for a larger one. */
    const uint8_t knob = data[size - 1];
    uint32_t slab_size = KNOB_SLAB(knob);
    const uint32_t max_pkts = KNOB_FEW(knob) ? KNOB_MAX(knob) : UINT32_MAX;
    uint64_t packets = 0;
    int status;
    do {
        int64_t limit = KNOB_LIMIT(knob) ? pkb_src_peek_ts(s) : INT64_MAX;
        struct pkb_fill f;
        pkb_fill_begin(&f, malloc(slab_size), slab_size, (uint32_t)(packets % 7));
        CHECK(f.slab, "out of memory");
        f.hash_opts = knob & 1 ? PKB_HASH_TUNNELS : 0;
        status = pkb_src_fill(s, &f, limit, max_pkts);
        check_slab(&f, max_pkts);
        struct pktipc_batch_rec rec;
        pkb_batch_publish(&rec, 3, 5, packets, &f, 7, 11);
        CHECK(rec.seq == packets && rec.slab == 3 && rec.gen == 5 && rec.count == f.count &&
              rec.data_bytes == slab_size - f.data_low && rec.first_ts_ns == f.first_ts_ns &&
              rec.last_ts_ns == f.last_ts_ns && rec.kernel_drops == 7 && rec.broker_drops == 11 &&
              rec.flags == 0, "the batch record");
        const struct pktipc_pkt *d = (const struct pktipc_pkt *)f.slab;
        for (uint32_t i = 0; i < f.count; i++, packets++) {
            struct pcap_pkthdr *h;
            const u_char *bytes;
            int r = pcap_next_ex(ref, &h, &bytes);
            CHECK(r == 1, "packet %llu: libpcap: %s", (unsigned long long)packets,
                  r == PCAP_ERROR_BREAK ? "end of file" : pcap_geterr(ref));
            CHECK(d[i].caplen == h->caplen && d[i].wirelen == h->len,
                  "packet %llu: caplen %u wirelen %u, libpcap %u %u", (unsigned long long)packets,
                  d[i].caplen, d[i].wirelen, h->caplen, h->len);
            CHECK(memcmp(f.slab + d[i].data_off, bytes, h->caplen) == 0,
                  "packet %llu: other bytes", (unsigned long long)packets);
            CHECK(d[i].ts_ns == want_ts(h, ns_per_tick), "packet %llu: time %lld",
                  (unsigned long long)packets, (long long)d[i].ts_ns);
            CHECK(d[i].ts_ns <= limit, "packet %llu: past the limit", (unsigned long long)packets);
            CHECK(d[i].linktype == linktype && d[i].vlan_tci == 0 &&
                  (d[i].flags & ~PKTIPC_F_TRUNCATED) == 0,
                  "packet %llu: linktype %u, tci %u, flags %#x", (unsigned long long)packets,
                  d[i].linktype, d[i].vlan_tci, d[i].flags);
            CHECK(d[i].hash == pkb_flow_hash(bytes, h->caplen, linktype, f.hash_opts),
                  "packet %llu: hash", (unsigned long long)packets);
        }
        if (status == PKB_FILL_LIMIT)
            CHECK(pkb_src_peek_ts(s) > limit, "stopped at a time within the limit");
        if (status == PKB_FILL_TOOBIG) {
            CHECK(f.count == 0 && frame_room(pkb_src_pending_caplen(s)) +
                  sizeof(struct pktipc_pkt) > slab_size,
                  "packet %llu, of %u bytes, does not fit a slab of %u bytes",
                  (unsigned long long)packets, pkb_src_pending_caplen(s), slab_size);
            if (slab_size < MAX_SLAB) {
                slab_size *= 2;
                status = PKB_FILL_FULL;
            }
        }
        free(f.slab);
    } while (status == PKB_FILL_FULL || status == PKB_FILL_LIMIT);

    struct pcap_pkthdr *h;
    const u_char *bytes;
    int r = pcap_next_ex(ref, &h, &bytes);
    const char *end = "?";
    switch (status) {
    case PKB_FILL_EOF:
        end = "eof";
        CHECK(r == PCAP_ERROR_BREAK, "end of file after %llu packets, libpcap: %d %s",
              (unsigned long long)packets, r, r == 1 ? "a packet" : pcap_geterr(ref));
        break;
    case PKB_FILL_TOOBIG:
        end = "toobig";
        CHECK(r == 1 && h->caplen == pkb_src_pending_caplen(s) &&
              frame_room(h->caplen) + sizeof(struct pktipc_pkt) > slab_size,
              "packet %llu does not fit a slab of %u bytes", (unsigned long long)packets,
              slab_size);
        break;
    case PKB_FILL_ERROR:
        end = "error";
        if (r == 1)     /* what libpcap read has a time nanoseconds cannot hold */
            CHECK(want_ts(h, ns_per_tick) < 0 && strstr(pkb_src_error(s), "past the year 2262"),
                  "error at packet %llu, libpcap read it: %s", (unsigned long long)packets,
                  pkb_src_error(s));
        else
            CHECK(r == PCAP_ERROR && strcmp(pkb_src_error(s), pcap_geterr(ref)) == 0,
                  "error at packet %llu: '%s', libpcap: '%s'", (unsigned long long)packets,
                  pkb_src_error(s), r == PCAP_ERROR_BREAK ? "end of file" : pcap_geterr(ref));
        break;
    default:
        CHECK(0, "pkb_src_fill returned %d", status);
    }
    if (status != PKB_FILL_TOOBIG)
        CHECK(pkb_src_peek_ts(s) == INT64_MAX, "the source goes on after its end");
    report(data, size, mapped, packets, end);
    pkb_src_close(s);
    pcap_close(ref);
    return 0;
}
