/*
 * Filters (pktipc_filter.h): libpcap compiles, bpf_filter runs. Built into
 * libpktipc and into the Python client's cffi module alike.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <pcap/pcap.h>

#include "pktipc_shm.h"
#include "pktipc_linktype.h"
#include "pktipc_filter.h"

struct pktipc_filter {
    uint32_t n;                         /* sources */
    uint32_t nprogs;                    /* distinct link types */
    const struct bpf_insn **code;       /* per source: its link type's program */
    struct bpf_program *progs;
    uint32_t *linktypes;                /* of progs[] */
};

int pktipc_linktype_dlt(int linktype)
{
    return pktipc_dlt_of_linktype(linktype);
}

void pktipc_filter_free(struct pktipc_filter *f)
{
    if (!f)
        return;
    for (uint32_t i = 0; i < f->nprogs; i++)
        pcap_freecode(&f->progs[i]);
    free(f->code);
    free(f->progs);
    free(f->linktypes);
    free(f);
}

/* Compiles expr for one link type into *prog: 0, or -1 with the reason. */
static int compile(const char *expr, uint32_t linktype, struct bpf_program *prog, char *errbuf,
                   int several)
{
    /* The snapshot length only sets what an accepting program returns. */
    pcap_t *p = pcap_open_dead(pktipc_dlt_of_linktype((int)linktype), 262144);
    if (!p) {
        snprintf(errbuf, PKTIPC_FILTER_ERRBUF_SIZE, "out of memory");
        return -1;
    }
    int r = pcap_compile(p, prog, expr, 1, PCAP_NETMASK_UNKNOWN);
    if (r < 0 && several) {     /* say which of the sources' link types refuses it */
        const char *name = pcap_datalink_val_to_name(pktipc_dlt_of_linktype((int)linktype));
        snprintf(errbuf, PKTIPC_FILTER_ERRBUF_SIZE, "filter '%.128s': %s (link type %s)", expr,
                 pcap_geterr(p), name ? name : "unknown");
    } else if (r < 0) {
        snprintf(errbuf, PKTIPC_FILTER_ERRBUF_SIZE, "filter '%.128s': %s", expr,
                 pcap_geterr(p));
    }
    pcap_close(p);
    return r < 0 ? -1 : 0;
}

int pktipc_filter_new(const char *expr, const uint32_t *linktypes, uint32_t n,
                      struct pktipc_filter **out, char *errbuf)
{
    struct pktipc_filter *f = calloc(1, sizeof(*f));
    *out = NULL;
    if (!f || !(f->code = calloc(n ? n : 1, sizeof(*f->code))) ||
        !(f->progs = calloc(n ? n : 1, sizeof(*f->progs))) ||
        !(f->linktypes = calloc(n ? n : 1, sizeof(*f->linktypes)))) {
        pktipc_filter_free(f);
        snprintf(errbuf, PKTIPC_FILTER_ERRBUF_SIZE, "out of memory");
        return -1;
    }
    f->n = n;
    int several = 0;
    for (uint32_t i = 1; i < n; i++)
        several |= linktypes[i] != linktypes[0];
    for (uint32_t i = 0; i < n; i++) {
        uint32_t j = 0;
        while (j < f->nprogs && f->linktypes[j] != linktypes[i])
            j++;
        if (j == f->nprogs) {
            if (compile(expr, linktypes[i], &f->progs[j], errbuf, several) < 0) {
                pktipc_filter_free(f);
                return -1;
            }
            f->linktypes[j] = linktypes[i];
            f->nprogs++;
        }
        f->code[i] = f->progs[j].bf_insns;
    }
    *out = f;
    return 0;
}

uint32_t pktipc_filter_run(const struct pktipc_filter *f, const uint8_t *slab,
                           const struct pktipc_pkt *pkts, const uint32_t *in, uint32_t k,
                           uint32_t *out)
{
    uint32_t m = 0;
    for (uint32_t j = 0; j < k; j++) {
        uint32_t i = in ? in[j] : j;
        const struct pktipc_pkt *p = &pkts[i];
        out[m] = i;
        if (p->iface < f->n)
            m += bpf_filter(f->code[p->iface], slab + p->data_off, p->wirelen, p->caplen) != 0;
    }
    return m;
}
