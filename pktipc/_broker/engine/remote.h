/*
 * What crosses hosts, in C (declarations only: cffi's cdef() reads this file
 * as it is). A gateway gathers a member's share of a slab into one buffer, to
 * be sent in one message; a relay places packets received so into its slabs.
 */

/* Copies the bytes of packets idx[0..k) of a slab into `out`, one after the
 * other, and writes their descriptors into `descs`, data_off counted from
 * `out`. `pkts` is a checked copy of the slab's descriptors. Returns the
 * bytes written (at most out_size: packets that would not fit are left out,
 * and so the return is checked against the sum of their caplen). */
uint64_t pkb_gather(const uint8_t *slab, const struct pktipc_pkt *pkts, const uint32_t *idx,
                    uint32_t k, uint8_t *out, uint64_t out_size, struct pktipc_pkt *descs);

/* Places packets pkts[0..n) (data_off counted from `data`, each checked to lie
 * within its data_len bytes) in f's slab, each as it came: time, lengths, link
 * type, flags, flow hash and interface. Returns how many fitted, from the
 * first. */
uint32_t pkb_fill_copy(struct pkb_fill *f, const struct pktipc_pkt *pkts, uint32_t n,
                       const uint8_t *data, uint64_t data_len);
