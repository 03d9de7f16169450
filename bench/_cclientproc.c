/*
 * One benchmark client in C, run as its own process by bench.cclient: the
 * counterpart of bench/_clientproc.py, printing the same JSON line.
 *
 *     _cclientproc SERVER NAME {c-batch,c-dispatch,c-release}
 *
 *   c-batch     walks each batch's descriptors, reading the first byte of
 *               every packet, and releases the batch
 *   c-dispatch  the same through pktipc_dispatch's callback
 *   c-release   as c-batch, then releases every packet one by one, last first
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <pktipc.h>

struct totals {
    pktipc_client *c;
    unsigned long long packets, caplen;
    long long last_ts;
    unsigned first_bytes;
};

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void on_packet(void *user, const struct pktipc_pkt *p, const uint8_t *data)
{
    struct totals *t = user;
    t->first_bytes += data[0];
    t->caplen += p->caplen;
    t->last_ts = p->ts_ns;
    t->packets++;
}

int main(int argc, char **argv)
{
    if (argc != 4 || strncmp(argv[3], "c-", 2)) {
        fprintf(stderr, "usage: _cclientproc SERVER NAME {c-batch,c-dispatch,c-release}\n");
        return 2;
    }
    const char *mode = argv[3];
    int dispatch = !strcmp(mode, "c-dispatch"), one_by_one = !strcmp(mode, "c-release");
    char errbuf[PKTIPC_ERRBUF_SIZE];
    struct pktipc_opts o = {.sz = sizeof(o), .server = argv[1], .name = argv[2],
                            .policy = PKTIPC_POLICY_BLOCK, .timeout_ms = 30000,
                            .reconnect_ms = 0, .errbuf = errbuf};
    struct totals t = {0};
    double t_start = mono();
    int r = pktipc_open(&o, &t.c);
    if (r < 0) {
        fprintf(stderr, "_cclientproc: %s\n", errbuf);
        return 1;
    }
    double t_attached = mono(), cpu0 = cpu(), t_first = 0;
    struct pktipc_batch b;
    for (;;) {
        if (dispatch) {
            r = pktipc_dispatch(t.c, 0, on_packet, &t, -1);
        } else if ((r = pktipc_next_batch(t.c, &b, -1)) > 0) {
            for (uint32_t i = 0; i < b.count; i++)
                on_packet(&t, &b.pkts[i], pktipc_batch_data(&b, &b.pkts[i]));
            if (one_by_one)
                for (uint32_t i = b.count; i-- > 0;)
                    pktipc_release(t.c, &b.pkts[i]);
            else
                pktipc_release_batch(t.c, &b);
        }
        if (r < 0)
            break;
        if (!t_first)
            t_first = mono();
    }
    double t_end = mono(), cpu_stream = cpu() - cpu0;
    struct pktipc_stats st;
    pktipc_stats(t.c, &st, sizeof(st));
    const char *end_error = r == -PKTIPC_EEOS ? pktipc_geterr(t.c) : pktipc_strerror(r);
    printf("{\"name\": \"%s\", \"mode\": \"%s\", \"packets\": %llu, \"caplen_sum\": %llu, "
           "\"last_ts\": %lld, \"t_start\": %.6f, \"t_attached\": %.6f, \"t_first\": %.6f, "
           "\"t_end\": %.6f, \"gaps\": %llu, \"end_error\": %s%s%s, \"cpu_stream_s\": %.4f, "
           "\"batches\": %llu, \"release_msgs\": %llu, \"first_bytes\": %u}\n",
           argv[2], mode, t.packets, t.caplen, t.last_ts, t_start, t_attached, t_first, t_end,
           (unsigned long long)st.gaps, *end_error ? "\"" : "", *end_error ? end_error : "null",
           *end_error ? "\"" : "", cpu_stream, (unsigned long long)st.batches,
           (unsigned long long)st.release_msgs, t.first_bytes);
    pktipc_close(t.c);
    return r == -PKTIPC_EEOS ? 0 : 1;
}
