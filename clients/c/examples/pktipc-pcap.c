/*
 * pktipc-pcap: writes what a client of a pktipc broker receives to stdout
 * as a nanosecond pcap stream, through the pcap_dispatch-style callback API.
 *
 *     pktipc-pcap [-n NAME] [-g GROUP] [-b flow|round-robin] [-p block|drop] [-C CREDIT]
 *                 [-c COUNT] SERVER [EXPRESSION] | tcpdump -r -
 *
 * EXPRESSION, a filter in tcpdump's syntax (opts.filter), keeps only the
 * packets it matches.
 * The file takes the link type of the first packet (a pcap file holds one)
 * and the largest snaplen of the broker's sources of that link type, as
 * `pktipc dump` does. It stops after COUNT packets or at the end of the
 * stream. The default policy is block: a recorder wants every packet. In a
 * group (-g) it writes this member's share of the group's packets.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <pktipc.h>

#define PCAP_NS_MAGIC 0xa1b23c4d

struct pcap_file_header {
    uint32_t magic;
    uint16_t version_major, version_minor;
    int32_t thiszone;
    uint32_t sigfigs, snaplen, linktype;
};

struct pcap_record {
    uint32_t sec, nsec, incl, orig;
};

struct out {
    pktipc_client *c;
    int started;
    uint16_t linktype;
    unsigned long long packets;
    int werr;               /* errno of a failed write to stdout */
    char err[256];
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void put(struct out *o, const void *p, size_t n)
{
    if (!o->werr && fwrite(p, 1, n, stdout) != n)
        o->werr = errno;
}

static void start(struct out *o, int linktype)
{
    struct pcap_file_header h = {PCAP_NS_MAGIC, 2, 4, 0, 0, 0, (uint32_t)linktype};
    for (unsigned i = 0; i < pktipc_iface_count(o->c); i++) {
        const struct pktipc_iface *f = pktipc_iface(o->c, i);
        if (f->linktype == (uint32_t)linktype && f->snaplen > h.snaplen)
            h.snaplen = f->snaplen;
    }
    if (!h.snaplen)
        h.snaplen = 262144;
    put(o, &h, sizeof(h));
    o->linktype = (uint16_t)linktype;
    o->started = 1;
}

static void write_packet(void *user, const struct pktipc_pkt *p, const uint8_t *data)
{
    struct out *o = user;
    if (o->err[0] || o->werr)
        return;
    if (!o->started)
        start(o, p->linktype);
    if (p->linktype != o->linktype) {
        snprintf(o->err, sizeof(o->err), "a packet of link type %u cannot go into a pcap "
                 "file of link type %u", p->linktype, o->linktype);
        return;
    }
    /* pcap's seconds are an unsigned 32-bit count: 1970 to 2106. */
    if (p->ts_ns < 0 || p->ts_ns / 1000000000 > UINT32_MAX) {
        snprintf(o->err, sizeof(o->err), "packet %llu: its time, %lld ns after 1970, is "
                 "outside what a pcap file can hold (1970 to 2106-02-07 06:28:15 UTC)",
                 (unsigned long long)o->packets + 1, (long long)p->ts_ns);
        return;
    }
    uint64_t sec = (uint64_t)p->ts_ns / 1000000000, nsec = (uint64_t)p->ts_ns % 1000000000;
    struct pcap_record r = {(uint32_t)sec, (uint32_t)nsec, p->caplen, p->wirelen};
    put(o, &r, sizeof(r));
    put(o, data, p->caplen);
    o->packets++;
}

static void usage(void)
{
    fprintf(stderr, "usage: pktipc-pcap [-n NAME] [-g GROUP] [-b flow|round-robin] "
                    "[-p block|drop] [-C CREDIT] [-c COUNT] SERVER [EXPRESSION]\n");
    exit(2);
}

static long number(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "pktipc-pcap: not a number between %ld and %ld: %s\n", lo, hi, s);
        exit(2);
    }
    return v;
}

static int balance_of(const char *s)
{
    if (!strcmp(s, "flow"))
        return PKTIPC_BALANCE_FLOW;
    if (!strcmp(s, "round-robin"))
        return PKTIPC_BALANCE_ROUND_ROBIN;
    fprintf(stderr, "pktipc-pcap: -b takes flow or round-robin, not %s\n", s);
    exit(2);
}

int main(int argc, char **argv)
{
    char name[64], errbuf[PKTIPC_ERRBUF_SIZE];
    snprintf(name, sizeof(name), "pcap-%d", (int)getpid());
    struct pktipc_opts opts = {.sz = sizeof(opts), .name = name, .policy = PKTIPC_POLICY_BLOCK,
                               .timeout_ms = -1, .reconnect_ms = -1, .errbuf = errbuf};
    unsigned long long limit = 0;
    int opt;
    while ((opt = getopt(argc, argv, "n:g:b:p:C:c:")) != -1) {
        switch (opt) {
        case 'n': opts.name = optarg; break;
        case 'g': opts.group = optarg; break;
        case 'b': opts.balance = balance_of(optarg); break;
        case 'p':
            if (strcmp(optarg, "drop") && strcmp(optarg, "block"))
                usage();
            opts.policy = strcmp(optarg, "block") ? PKTIPC_POLICY_DROP : PKTIPC_POLICY_BLOCK;
            break;
        case 'C': opts.credit = (unsigned)number(optarg, 1, 4096); break;
        case 'c': limit = (unsigned long long)number(optarg, 1, 1L << 62); break;
        default: usage();
        }
    }
    if (optind >= argc)
        usage();
    opts.server = argv[optind];
    /* The expression may come as one argument or several, as tcpdump's. */
    static char filter[4096];
    for (int i = optind + 1; i < argc; i++) {
        size_t len = strlen(filter);
        if ((size_t)snprintf(filter + len, sizeof(filter) - len, "%s%s", len ? " " : "",
                             argv[i]) >= sizeof(filter) - len) {
            fprintf(stderr, "pktipc-pcap: the filter expression is longer than %zu bytes\n",
                    sizeof(filter) - 1);
            return 2;
        }
    }
    opts.filter = filter;
    if (isatty(STDOUT_FILENO)) {
        fprintf(stderr, "pktipc-pcap: stdout is a terminal; pipe it, e.g. into tcpdump -r -\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);   /* a reader that goes away is an EPIPE, seen below */
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    static char buf[1 << 20];
    setvbuf(stdout, buf, _IOFBF, sizeof(buf));

    struct out o = {0};
    int r = pktipc_open(&opts, &o.c);
    if (r < 0) {
        fprintf(stderr, "pktipc-pcap: %s\n", errbuf);
        return 1;
    }
    while (!stop && !o.err[0] && !o.werr && (!limit || o.packets < limit)) {
        int max = limit && limit - o.packets < 1u << 30 ? (int)(limit - o.packets) : 0;
        r = pktipc_dispatch(o.c, max, write_packet, &o, -1);
        if (r < 0 && r != -PKTIPC_EINTR)
            break;
        if (r > 0 && fflush(stdout) && !o.werr)
            o.werr = errno;     /* a reader sees each batch as it comes */
    }
    if (!o.started && !o.err[0]) {
        const struct pktipc_iface *f = pktipc_iface(o.c, 0);
        start(&o, f ? (int)f->linktype : 1);
    }
    if (fflush(stdout) && !o.werr)
        o.werr = errno;
    int status = 0;
    if (o.werr) {
        if (o.werr != EPIPE) {      /* the reader went away (| head): not a failure */
            fprintf(stderr, "pktipc-pcap: stdout: %s\n", strerror(o.werr));
            status = 1;
        }
    } else if (o.err[0]) {
        fprintf(stderr, "pktipc-pcap: %s\n", o.err);
        status = 1;
    } else if (stop) {
        status = 130;
    } else if (r < 0 && r != -PKTIPC_EINTR && (r != -PKTIPC_EEOS || *pktipc_geterr(o.c))) {
        fprintf(stderr, "pktipc-pcap: %s\n", pktipc_geterr(o.c));
        status = 1;
    }
    pktipc_close(o.c);
    return status;
}
