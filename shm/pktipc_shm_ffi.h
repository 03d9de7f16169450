/*
 * The PKTIPC_INLINE helpers of pktipc_shm.h as real symbols, compiled by
 * pktipc_shm.c, for FFI users (cffi reads this file as it is: prototypes
 * only). The compiler checks every prototype against its definition there.
 */
int pktipc_geometry(uint32_t slab_size, uint32_t slab_count, uint32_t iface_count,
                    uint32_t frame_size, uint32_t frame_count, struct pktipc_geometry *g);
int pktipc_shm_attach(const void *base, uint64_t size, struct pktipc_header *h);
uint32_t pktipc_pkts_check(const struct pktipc_header *h, uint32_t slab,
                           const struct pktipc_pkt *pkts, uint32_t n);
uint64_t pktipc_hrw_weight(uint32_t hash, uint32_t slot);
uint32_t pktipc_flow_owner(uint32_t hash, const uint32_t *members, uint32_t n);
uint32_t pktipc_select(const struct pktipc_pkt *pkts, uint32_t count, const uint8_t *mask,
                       const uint32_t *members, uint32_t n, uint32_t me, uint32_t *out);
void pktipc_share_counts(const struct pktipc_pkt *pkts, uint32_t count, const uint8_t *mask,
                         const uint32_t *members, uint32_t n, uint32_t *counts);
int pktipc_tx_geometry(uint32_t frame_count, uint32_t frame_size, struct pktipc_tx_geometry *g);
int pktipc_tx_attach(const void *base, uint64_t size, struct pktipc_tx_header *h);
