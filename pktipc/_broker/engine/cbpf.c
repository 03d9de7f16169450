/* tcpdump filters over frames in memory (cbpf.h). */
#include <stdio.h>
#include <stdlib.h>

#include <pcap/pcap.h>

#include "cbpf.h"
#include "pktipc_shm.h"
#include "ingest.h"     /* PKB_ERRBUF_SIZE */

struct pkb_cbpf {
    struct bpf_program prog;
};

pkb_cbpf *pkb_cbpf_compile(const char *filter, uint32_t snaplen, char *errbuf)
{
    pkb_cbpf *f = calloc(1, sizeof(*f));
    pcap_t *p = pcap_open_dead(DLT_EN10MB, (int)snaplen);
    if (!f || !p) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "out of memory");
    } else if (pcap_compile(p, &f->prog, filter, 1, PCAP_NETMASK_UNKNOWN) < 0) {
        snprintf(errbuf, PKB_ERRBUF_SIZE, "bad filter '%s': %s", filter, pcap_geterr(p));
    } else {
        pcap_close(p);
        return f;
    }
    if (p)
        pcap_close(p);
    free(f);
    return NULL;
}

int pkb_cbpf_match(const pkb_cbpf *f, const uint8_t *frame, uint32_t len)
{
    return bpf_filter(f->prog.bf_insns, frame, len, len) != 0;
}

void pkb_cbpf_free(pkb_cbpf *f)
{
    if (!f)
        return;
    pcap_freecode(&f->prog);
    free(f);
}
