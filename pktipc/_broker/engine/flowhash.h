/*
 * pktipc's symmetric flow hash: declarations only (cffi's cdef() reads this
 * file as it is, so: integer #defines and prototypes, nothing else). What is
 * hashed, for every kind of frame, is in shm/LAYOUT.md, "Flow hash".
 */

/* pkb_flow_hash() options */
#define PKB_HASH_TUNNELS     0x1   /* GRE, IP-in-IP, VXLAN, GTP-U: hash the inner flow */

/* The flow hash of a frame of `caplen` bytes and link type `linktype`
 * (a LINKTYPE_* value): both directions of a flow hash alike. 0 when there
 * is nothing to hash (too short, or a link type it does not read), never
 * otherwise. Reads no byte at or past frame[caplen]. */
uint32_t pkb_flow_hash(const uint8_t *frame, uint32_t caplen, uint32_t linktype,
                          uint32_t opts);
