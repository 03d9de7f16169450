/*
 * The capture-file writer's hot path: see capwrite.h.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pcap/pcap.h>

#include "pktipc_shm.h"
#include "capwrite.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "capture files are written in the host's byte order, which must be little-endian"
#endif

/* epb_flags: bits 0-1 the direction, bits 2-4 the reception type. */
#define EPB_INBOUND     0x1u
#define EPB_OUTBOUND    0x2u
#define EPB_UNICAST     (1u << 2)
#define EPB_MULTICAST   (2u << 2)
#define EPB_BROADCAST   (3u << 2)
#define EPB_PROMISCUOUS (4u << 2)

static uint32_t epb_flags(uint16_t flags)
{
    switch ((flags & PKTIPC_F_DIR_MASK) >> PKTIPC_F_DIR_SHIFT) {
    case PKTIPC_DIR_HOST:      return EPB_INBOUND | EPB_UNICAST;
    case PKTIPC_DIR_BROADCAST: return EPB_INBOUND | EPB_BROADCAST;
    case PKTIPC_DIR_MULTICAST: return EPB_INBOUND | EPB_MULTICAST;
    case PKTIPC_DIR_OTHERHOST: return EPB_INBOUND | EPB_PROMISCUOUS;
    case PKTIPC_DIR_OUTGOING:  return EPB_OUTBOUND;
    default:                   return 0;
    }
}

static uint8_t *put32(uint8_t *o, uint32_t v)
{
    memcpy(o, &v, 4);
    return o + 4;
}

/* pcap's seconds are an unsigned 32-bit count: times from 1970 to 2106 */
static const uint64_t PCAP_TS_END = ((uint64_t)1 << 32) * 1000000000u;

int64_t capw_records(uint32_t fmt, uint32_t snaplen, uint8_t *out, uint64_t out_len,
                     const uint8_t *slab, uint64_t slab_len,
                     const struct pktipc_pkt *pkts, const uint32_t *idx, uint32_t n,
                     const uint32_t *ifid)
{
    uint8_t *o = out;
    uint64_t left = out_len;
    if (fmt != CAPW_PCAP && fmt != CAPW_PCAPNG && fmt != CAPW_PCAP_US)
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        const struct pktipc_pkt *p = &pkts[idx[i]];
        if ((uint64_t)p->data_off + p->caplen > slab_len || p->ts_ns < 0)
            return -1;
        uint32_t caplen = snaplen && p->caplen > snaplen ? snaplen : p->caplen;
        uint64_t ts = (uint64_t)p->ts_ns;
        const uint8_t *data = slab + p->data_off;
        if (fmt == CAPW_PCAP || fmt == CAPW_PCAP_US) {
            if (ts >= PCAP_TS_END || left < 16 + (uint64_t)caplen)
                return -1;
            uint32_t sub = (uint32_t)(ts % 1000000000u);
            o = put32(o, (uint32_t)(ts / 1000000000u));
            o = put32(o, fmt == CAPW_PCAP_US ? sub / 1000u : sub);
            o = put32(o, caplen);
            o = put32(o, p->wirelen);
            memcpy(o, data, caplen);
            o += caplen;
            left -= 16 + (uint64_t)caplen;
            continue;
        }
        uint32_t pad = -caplen & 3u, flags = epb_flags(p->flags);
        uint64_t size = 32 + (uint64_t)caplen + pad + (flags ? 12 : 0);
        if (left < size)
            return -1;
        o = put32(o, 6);
        o = put32(o, (uint32_t)size);
        o = put32(o, ifid[i]);
        o = put32(o, (uint32_t)(ts >> 32));
        o = put32(o, (uint32_t)ts);
        o = put32(o, caplen);
        o = put32(o, p->wirelen);
        memcpy(o, data, caplen);
        memset(o + caplen, 0, pad);
        o += caplen + pad;
        if (flags) {
            o = put32(o, 2 | 4u << 16);     /* epb_flags, 4 bytes */
            o = put32(o, flags);
            o = put32(o, 0);                /* opt_endofopt */
        }
        o = put32(o, (uint32_t)size);
        left -= size;
    }
    return (int64_t)(o - out);
}

struct capw_filter {
    struct bpf_program prog;
};

capw_filter *capw_filter_new(uint32_t linktype, uint32_t snaplen, const char *expr,
                             char *errbuf)
{
    pcap_t *p = pcap_open_dead_with_tstamp_precision((int)linktype, (int)snaplen,
                                                     PCAP_TSTAMP_PRECISION_NANO);
    if (!p) {
        snprintf(errbuf, CAPW_ERRBUF_SIZE, "libpcap cannot read link type %u", linktype);
        return NULL;
    }
    capw_filter *f = calloc(1, sizeof *f);
    if (!f) {
        snprintf(errbuf, CAPW_ERRBUF_SIZE, "out of memory");
        pcap_close(p);
        return NULL;
    }
    if (pcap_compile(p, &f->prog, expr, 1, PCAP_NETMASK_UNKNOWN) < 0) {
        snprintf(errbuf, CAPW_ERRBUF_SIZE, "bad filter '%s': %s", expr, pcap_geterr(p));
        free(f);
        pcap_close(p);
        return NULL;
    }
    pcap_close(p);
    return f;
}

void capw_filter_free(capw_filter *f)
{
    if (!f)
        return;
    pcap_freecode(&f->prog);
    free(f);
}

int64_t capw_filter_run(const capw_filter *f, const uint8_t *slab, uint64_t slab_len,
                        const struct pktipc_pkt *pkts, const uint32_t *idx, uint32_t n,
                        uint32_t *out)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct pktipc_pkt *p = &pkts[idx[i]];
        if ((uint64_t)p->data_off + p->caplen > slab_len)
            return -1;
        if (bpf_filter(f->prog.bf_insns, slab + p->data_off, p->wirelen, p->caplen))
            out[k++] = idx[i];
    }
    return k;
}
