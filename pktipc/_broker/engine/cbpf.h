/*
 * tcpdump filters run by the broker over frames in memory (AF_XDP's):
 * libpcap's compiler and interpreter, behind a file of their own, because
 * libpcap's struct bpf_insn (classic BPF) and the kernel's (eBPF, which
 * libbpf includes) share a name. Not read by cffi.
 */
#ifndef PKB_CBPF_H
#define PKB_CBPF_H

#include <stdint.h>

typedef struct pkb_cbpf pkb_cbpf;

/* Compiles `filter` as tcpdump would for an Ethernet capture file (VLAN tags
 * are matched in the bytes); NULL with libpcap's message in errbuf
 * (PKB_ERRBUF_SIZE bytes). */
pkb_cbpf *pkb_cbpf_compile(const char *filter, uint32_t snaplen, char *errbuf);
/* Whether the frame of `len` bytes at `frame` passes. */
int pkb_cbpf_match(const pkb_cbpf *f, const uint8_t *frame, uint32_t len);
void pkb_cbpf_free(pkb_cbpf *f);

#endif /* PKB_CBPF_H */
