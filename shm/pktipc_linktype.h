/*
 * A descriptor's `linktype` is a LINKTYPE_* value, as capture files carry
 * it; libpcap's API speaks DLT_*. The two differ only for these historical
 * values (libpcap's pcap-common.c): one table, read both ways, by the
 * broker (what libpcap reads, into descriptors) and libpktipc
 * (pktipc_linktype_to_dlt, for a consumer that hands packets to libpcap).
 */
#ifndef PKTIPC_LINKTYPE_H
#define PKTIPC_LINKTYPE_H

#include <pcap/dlt.h>

static const struct {
    int linktype, dlt;
} PKTIPC_LINKTYPE_DLT[] = {
    {100, DLT_ATM_RFC1483},
    {101, DLT_RAW},
    {102, DLT_SLIP_BSDOS},
    {103, DLT_PPP_BSDOS},
    {106, DLT_ATM_CLIP},
};

#define PKTIPC_LINKTYPE_DLT_COUNT (sizeof(PKTIPC_LINKTYPE_DLT) / sizeof(PKTIPC_LINKTYPE_DLT[0]))

static inline int pktipc_dlt_of_linktype(int linktype)
{
    for (unsigned i = 0; i < PKTIPC_LINKTYPE_DLT_COUNT; i++)
        if (PKTIPC_LINKTYPE_DLT[i].linktype == linktype)
            return PKTIPC_LINKTYPE_DLT[i].dlt;
    return linktype;
}

static inline int pktipc_linktype_of_dlt(int dlt)
{
    for (unsigned i = 0; i < PKTIPC_LINKTYPE_DLT_COUNT; i++)
        if (PKTIPC_LINKTYPE_DLT[i].dlt == dlt)
            return PKTIPC_LINKTYPE_DLT[i].linktype;
    return dlt;
}

#endif /* PKTIPC_LINKTYPE_H */
