/*
 * pktipc-count: counts the packets and bytes a pktipc broker hands out, per
 * second and in all, reading the first byte of every packet as a consumer
 * would.
 *
 *     pktipc-count [-n NAME] [-g GROUP] [-b flow|round-robin] [-p drop|block] [-C CREDIT]
 *                  [-c COUNT] [-i SECONDS] SERVER
 *
 * It stops after COUNT packets, at the end of the stream, or on Ctrl-C, and
 * prints its totals. The default policy is drop: a meter should never hold
 * the tap back. Several of them in one group (-g) count its packets
 * between them, divided by flow or batch by batch (-b).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <pktipc.h>

static volatile sig_atomic_t stop;
static volatile unsigned first_bytes;   /* so that reading them is not optimised away */

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(void)
{
    fprintf(stderr, "usage: pktipc-count [-n NAME] [-g GROUP] [-b flow|round-robin] "
                    "[-p drop|block] [-C CREDIT] [-c COUNT] [-i SECONDS] SERVER\n");
    exit(2);
}

static long number(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "pktipc-count: not a number between %ld and %ld: %s\n", lo, hi, s);
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
    fprintf(stderr, "pktipc-count: -b takes flow or round-robin, not %s\n", s);
    exit(2);
}

int main(int argc, char **argv)
{
    char name[64], errbuf[PKTIPC_ERRBUF_SIZE];
    snprintf(name, sizeof(name), "count-%d", (int)getpid());
    struct pktipc_opts o = {.sz = sizeof(o), .name = name, .timeout_ms = -1,
                            .reconnect_ms = -1, .errbuf = errbuf};
    unsigned long long limit = 0;
    double interval = 1.0;
    int opt;
    while ((opt = getopt(argc, argv, "n:g:b:p:C:c:i:")) != -1) {
        switch (opt) {
        case 'n': o.name = optarg; break;
        case 'g': o.group = optarg; break;
        case 'b': o.balance = balance_of(optarg); break;
        case 'p':
            if (strcmp(optarg, "drop") && strcmp(optarg, "block"))
                usage();
            o.policy = strcmp(optarg, "block") ? PKTIPC_POLICY_DROP : PKTIPC_POLICY_BLOCK;
            break;
        case 'C': o.credit = (unsigned)number(optarg, 1, 4096); break;
        case 'c': limit = (unsigned long long)number(optarg, 1, 1L << 62); break;
        case 'i': interval = (double)number(optarg, 1, 3600); break;
        default: usage();
        }
    }
    if (optind != argc - 1)
        usage();
    o.server = argv[optind];

    struct sigaction sa = {.sa_handler = on_signal};   /* no SA_RESTART: waits end */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    pktipc_client *c;
    int r = pktipc_open(&o, &c);
    if (r < 0) {
        fprintf(stderr, "pktipc-count: %s\n", errbuf);
        return 1;
    }
    unsigned long long packets = 0, bytes = 0, last_packets = 0, last_bytes = 0;
    unsigned sum = 0;
    double start = now(), last = start;
    struct pktipc_batch b;
    while (!stop && (!limit || packets < limit)) {
        r = pktipc_next_batch(c, &b, 100);
        if (r > 0) {
            uint32_t n = b.count;
            if (limit && packets + n > limit)
                n = (uint32_t)(limit - packets);
            for (uint32_t i = 0; i < n; i++) {
                sum += pktipc_batch_data(&b, &b.pkts[i])[0];
                bytes += b.pkts[i].caplen;
            }
            packets += n;
            pktipc_release_batch(c, &b);
        } else if (r < 0 && r != -PKTIPC_EINTR) {
            break;
        }
        double t = now();
        if (t - last >= interval) {
            struct pktipc_stats st;
            pktipc_stats(c, &st, sizeof(st));
            printf("t %.1f pkt/s %.0f Mbit/s %.2f packets %llu drops %llu reconnects %llu\n",
                   t - start, (packets - last_packets) / (t - last),
                   (bytes - last_bytes) * 8 / (t - last) / 1e6, packets,
                   (unsigned long long)st.drops, (unsigned long long)st.reconnects);
            fflush(stdout);
            last = t;
            last_packets = packets;
            last_bytes = bytes;
        }
    }
    struct pktipc_stats st;
    pktipc_stats(c, &st, sizeof(st));
    double secs = now() - start;
    printf("total packets %llu bytes %llu seconds %.3f drops %llu reconnects %llu group %s "
           "balance %s\n", packets, bytes, secs, (unsigned long long)st.drops,
           (unsigned long long)st.reconnects, pktipc_group(c),
           pktipc_balance(c) == PKTIPC_BALANCE_FLOW ? "flow" : "round-robin");
    first_bytes = sum;
    int status = 0;
    if (r < 0 && r != -PKTIPC_EINTR && (r != -PKTIPC_EEOS || *pktipc_geterr(c))) {
        fprintf(stderr, "pktipc-count: %s\n", pktipc_geterr(c));
        status = 1;
    }
    pktipc_close(c);
    return status;
}
