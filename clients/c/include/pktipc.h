/*
 * libpktipc: the C client of pktipc.
 *
 * A pktipc broker copies packets once into a shared-memory ring and hands
 * them to named clients in batches; a client reads them in place, mapped
 * read-only, and gives them back. This library speaks the broker's control
 * protocol (ZeroMQ, msgpack) itself: no Python runs in the consumer.
 *
 *     struct pktipc_opts o = { .sz = sizeof o, .server = "tap", .name = "ids",
 *                              .timeout_ms = -1, .reconnect_ms = -1 };
 *     pktipc_client *c;
 *     int r = pktipc_open(&o, &c);
 *     if (r < 0)
 *         errx(1, "%s", pktipc_strerror(r));
 *     struct pktipc_batch b;
 *     while ((r = pktipc_next_batch(c, &b, 1000)) >= 0) {
 *         for (uint32_t i = 0; i < b.count; i++)
 *             handle(&b.pkts[i], pktipc_batch_data(&b, &b.pkts[i]));
 *         pktipc_release_batch(c, &b);
 *     }
 *     if (r != -PKTIPC_EEOS || *pktipc_geterr(c))
 *         warnx("%s", pktipc_geterr(c));
 *     pktipc_close(c);
 *
 * Groups. Every group of a broker receives every packet; the members of a
 * group, C or Python clients alike, share its packets (opts.group,
 * opts.balance). By flow, every packet of a flow, both directions, goes to
 * one member; round-robin, whole batches go to the members in turn. A
 * batch then holds only this member's share of its slab, chosen as
 * pktipc_select (pktipc_shm.h) says: b.count packets in b.pkts[] (b.index
 * says where each stands in the slab), released as any batch; the slab
 * goes back to the broker once the share is released.
 * A share that a member leaving passes on comes as a batch of its own,
 * with a seq this member may have had, and released, already.
 *
 * Filters. opts.filter keeps only the packets a tcpdump expression
 * matches ("tcp port 443", "vlan 100 and tcp"): libpcap compiles it for each
 * link type among the broker's sources, as tcpdump -r does for a file (a
 * frame is tested as it is delivered, with a VLAN tag the kernel stripped
 * put back), and the program runs in the library over each batch (in a
 * group, over this member's share) before it is handed out. A batch holds
 * only the matching packets (b.index says where they stand in the slab);
 * one with none is given back to the broker at once, never handed out.
 * pktipc_stats' `filtered` counts what was left out. An expression libpcap
 * refuses, or one that cannot apply to a source's link type, fails
 * pktipc_open with -PKTIPC_EFILTER and libpcap's message (and ends a client
 * that finds it so for a broker that takes a lost one's place).
 *
 * Three ways to consume, to be mixed freely:
 *  - batches: pktipc_next_batch, then pktipc_release_batch;
 *  - packets released one by one, in any order, from any thread, at any time
 *    later (pktipc_release): a slab goes back to the broker when its last
 *    packet is released, in one control message for the slab (several slabs
 *    may share one), never one per packet;
 *  - a callback per packet, valid until the callback returns, as
 *    pcap_dispatch (pktipc_dispatch).
 *
 * Threads. One thread at a time consumes: pktipc_next_batch, pktipc_dispatch,
 * pktipc_stats (a second concurrent caller gets -PKTIPC_EBUSY); it alone
 * uses the ZeroMQ socket, and it sends the RELEASE messages; pktipc_iface
 * is for it too. pktipc_release, pktipc_release_batch and pktipc_pkt_data
 * may be called from any thread, at any time between pktipc_open and
 * pktipc_close. pktipc_close must be the last call, once no other thread
 * uses the client.
 *
 * Keeping alive. The broker evicts a client it has not heard from for its
 * liveness (30 s by default) or that holds one batch longer than its lease
 * (30 s by default). The client sends heartbeats whenever the consuming
 * thread calls it and one is due; a consumer that waits in
 * pktipc_next_batch or pktipc_dispatch is called often enough.
 *
 * Broker restarts. If the broker stops answering (or a new one of the same
 * name does not know this client), the client looks for the broker that
 * takes its place, for reconnect_ms, and carries on with it: sequence
 * numbers start again and pktipc_stats' epoch changes. Packets of the old
 * broker stay readable (its segment stays mapped) until they are released.
 *
 * Descriptors are copies. b.pkts[] is the library's copy of the batch's
 * descriptors, checked (every frame within its slab) after it was copied,
 * never the segment's own, which the broker may write at any time; the
 * bytes stay in place. The segment's header is read once, checked, when
 * the client attaches. A broker that breaks these rules gets
 * -PKTIPC_EPROTO or -PKTIPC_ELAYOUT, never a read out of bounds.
 *
 * Sending. A broker that sends on its interfaces (pktipc serve -i IFACE --tx)
 * sends this client's frames too, if it allows this client's user (serve
 * --allow-tx): pktipc_tx_alloc gives room for a frame in the client's TX
 * area, a shared-memory object only this client writes and the broker maps
 * read-only; the frame is written there (a reply built from a received
 * packet: one memcpy of it, then edits in place), pktipc_tx_send queues
 * it, pktipc_tx_flush hands the queued frames to the broker in one message.
 * The broker copies them into the kernel's TX ring of their interface, in
 * order, and gives the slots back; a frame it would not send is refused
 * and counted. Sending is the consuming thread's, as pktipc_next_batch is.
 *
 *     uint8_t *f;
 *     if (pktipc_tx_alloc(c, len, p->iface, -1, &f) == 0) {
 *         memcpy(f, pktipc_batch_data(&b, p), len);
 *         ...edit f...
 *         pktipc_tx_send(c, f, len);
 *     }
 *     pktipc_tx_flush(c, 0);
 *
 * Errors are negative -PKTIPC_E* values; no return value means two things.
 * After -PKTIPC_EPROTO, -PKTIPC_EGONE and -PKTIPC_EEVICTED the client is
 * unusable but for releasing what it holds, pktipc_stats and pktipc_close;
 * after -PKTIPC_EEOS the stream is over and every later call says so.
 */
#ifndef PKTIPC_H
#define PKTIPC_H

#include <stddef.h>
#include <stdint.h>

#include "pktipc_shm.h"   /* struct pktipc_pkt, PKTIPC_F_*, the segment's layout */

#ifdef __cplusplus
extern "C" {
#endif

/* What the library exports; a result that must not be ignored. */
#if defined(__GNUC__) || defined(__clang__)
#define PKTIPC_API __attribute__((visibility("default")))
#define PKTIPC_WARN_UNUSED_RESULT __attribute__((warn_unused_result))
#else
#define PKTIPC_API
#define PKTIPC_WARN_UNUSED_RESULT
#endif

#define PKTIPC_EINVAL      1   /* an argument is invalid (NULL, wrong sz, name, policy, ...) */
#define PKTIPC_ENOBROKER   2   /* no broker answers at that name or endpoint */
#define PKTIPC_EPERM       3   /* the broker's socket or segment is not ours to use */
#define PKTIPC_ENAMETAKEN  4   /* another live client of the broker has this name */
#define PKTIPC_EREFUSED    5   /* the broker refused the request; pktipc_geterr says why */
#define PKTIPC_EPROTO      6   /* the broker broke the protocol; pktipc_geterr says how */
#define PKTIPC_ELAYOUT     7   /* the broker's segment has a layout this library does not read */
#define PKTIPC_EGONE       8   /* the broker stopped answering and none took its place in time */
#define PKTIPC_EEVICTED    9   /* the broker evicted this client; pktipc_geterr says why */
#define PKTIPC_EEOS       10   /* end of stream: the broker sent its last batch (no failure) */
#define PKTIPC_EALREADY   11   /* the packet or batch was released already */
#define PKTIPC_EFOREIGN   12   /* not a packet or batch that this client was given */
#define PKTIPC_EBUSY      13   /* another thread is consuming from this client right now */
#define PKTIPC_EINTR      14   /* a signal interrupted the wait; nothing was lost, call again */
#define PKTIPC_ENOMEM     15   /* out of memory */
#define PKTIPC_ESYS       16   /* a system call failed; pktipc_geterr says which */
#define PKTIPC_EBALANCE   17   /* the group balances in the other mode, its first member's */
#define PKTIPC_EGROUP     18   /* this name is kept in another group (it left within --grace) */
#define PKTIPC_EUNTRUSTED 19   /* the broker's socket or segment is not owned as a broker's is:
                                  another user may be posing as the broker */
#define PKTIPC_EAGAIN     20   /* every slot of the TX area waits for the broker: try again */
#define PKTIPC_EFILTER    21   /* libpcap refused opts.filter; pktipc_geterr (or opts.errbuf) has
                                  its message */

#define PKTIPC_POLICY_DROP   0   /* the broker never waits for this client: it skips ahead */
#define PKTIPC_POLICY_BLOCK  1   /* lossless: the broker waits for this client */

#define PKTIPC_BALANCE_DEFAULT      0   /* the group's mode; a new group balances by flow */
#define PKTIPC_BALANCE_FLOW         1   /* every packet of a flow, both ways, to one member */
#define PKTIPC_BALANCE_ROUND_ROBIN  2   /* whole batches to the members in turn */

#define PKTIPC_ERRBUF_SIZE 256

typedef struct pktipc_client pktipc_client;            /* opaque */

/* Options, as libbpf's: sz first, sizeof(struct pktipc_opts) of the
 * headers built against. The structure only grows at its end: a program
 * built with fewer fields gets the library's defaults for the others, and
 * one built with more (a newer header) is accepted if what this library
 * does not know is zero. Zero is every field's default. */
struct pktipc_opts {
    size_t sz;              /* sizeof(struct pktipc_opts) */
    const char *server;     /* broker name, or a control endpoint "ipc://..." / "tcp://..." */
    const char *name;       /* client name, unique on that broker */
    const char *group;      /* NULL: a group of its own, named as the client */
    int policy;             /* PKTIPC_POLICY_DROP (default) or PKTIPC_POLICY_BLOCK */
    unsigned credit;        /* batches held at most; 0: the broker's default */
    int timeout_ms;         /* for connecting; <0: default (5000) */
    int reconnect_ms;       /* how long to look for a broker that takes the place of a
                               lost one; <0: default (30000); 0: never (-PKTIPC_EGONE) */
    char *errbuf;           /* NULL, or PKTIPC_ERRBUF_SIZE bytes: why pktipc_open failed */
    /* --- version 1 ends here --- */
    int balance;            /* PKTIPC_BALANCE_*: how the group divides its packets; asking
                               for another mode than the group's is refused (-PKTIPC_EBALANCE) */
    /* --- added with version node PKTIPC_1.1 (sending) --- */
    unsigned tx_frames;     /* slots of the TX area, a power of two; 0: 1024 (pktipc_open
                               refuses a TX area it could not make: -PKTIPC_EINVAL) */
    unsigned tx_frame_size; /* bytes of a slot (the longest frame), a multiple of 64; 0: 2048 */
    /* --- added with the clients' filter --- */
    const char *filter;     /* NULL or "": every packet; else only the packets this
                               expression (tcpdump's syntax) matches: see Filters above */
};

struct pktipc_batch {       /* filled by pktipc_next_batch */
    uint64_t seq;           /* sequence number of the slab's first packet */
    uint32_t count;         /* descriptors in pkts[] (only this member's packets when balanced) */
    const struct pktipc_pkt *pkts;  /* copies of the descriptors, checked */
    const uint32_t *index;  /* NULL: pkts[i] is packet i of the slab; else (a share) pkts[i]
                               is packet index[i], ascending: see pktipc_batch_seq */
    const uint8_t *base;    /* the batch's slab: a packet's bytes are at base + data_off */
    /* private: */
    uint64_t ticket_;
    void *slot_;
};

/* Counters since pktipc_open, monotonic; the broker's are the current
 * broker's own (a broker that takes the place of a lost one starts at 0).
 * It only grows at its end: pktipc_stats fills as much of it as the caller
 * says it has. */
struct pktipc_stats {
    uint64_t packets;           /* packets received */
    uint64_t bytes;             /* their captured bytes */
    uint64_t batches;           /* batches received */
    uint64_t released;          /* batches given back */
    uint64_t release_msgs;      /* RELEASE messages sent (one may carry several batches) */
    uint64_t held;              /* batches held now */
    uint64_t drops;             /* packets the broker skipped for this client (policy drop),
                                   as far as it has told (it tells before the next batch) */
    uint64_t gaps;              /* times it did so */
    uint64_t reconnects;        /* attachments to a broker that took the place of a lost one */
    uint64_t epoch;             /* the current broker's */
    uint64_t broker_packets;    /* packets the broker placed in slabs */
    uint64_t broker_bytes;
    uint64_t broker_batches;
    uint64_t broker_drops;      /* packets the broker could not place */
    uint64_t client_drops;      /* packets skipped for lagging drop clients, all of them */
    uint64_t protocol_errors;   /* malformed or refused control messages */
    uint64_t kernel_packets;    /* live sources: packets the kernel saw */
    uint64_t kernel_drops;      /* live sources: packets the kernel dropped */
    uint64_t kernel_freezes;    /* live sources: times the kernel ring froze */
    uint64_t tx_submitted;      /* frames handed to the broker (pktipc_tx_flush) */
    uint64_t tx_sent;           /* of those, copied by the broker into the kernel's TX ring */
    uint64_t tx_refused;        /* of those, refused by the broker (pktipc_tx_flush says why) */
    uint64_t tx_lost;           /* of those, unanswered by a broker that was lost */
    uint64_t filtered;          /* of this client's packets, those opts.filter left out */
};

/* Attaches to a broker: 0 with *out set, or -PKTIPC_E* with *out NULL (and
 * the reason in opts->errbuf if given). */
PKTIPC_API PKTIPC_WARN_UNUSED_RESULT
int pktipc_open(const struct pktipc_opts *opts, pktipc_client **out);

/* Detaches (BYE) and frees everything, NULL-safe. Packets still held are
 * unmapped with it: no thread may use them any more. */
PKTIPC_API void pktipc_close(pktipc_client *c);

/* A descriptor to poll (for reading) in one's own event loop. It becomes
 * readable when the client has something to do: a message came from the
 * broker, another thread released a slab, a heartbeat or a reconnection
 * attempt is due. ZeroMQ's part of it is edge-triggered: once it is
 * readable, call pktipc_next_batch(c, &b, 0) (or pktipc_dispatch with
 * timeout 0) until it returns 0, -PKTIPC_EINTR or an error; only then is
 * waiting on it again safe. The descriptor stays the same across broker
 * restarts. */
PKTIPC_API int pktipc_fd(const pktipc_client *c);

/* The next batch, waiting at most timeout_ms (<0: for ever): its packet
 * count (>0), 0 if none came in time, or -PKTIPC_E* (-PKTIPC_EEOS after
 * the last batch). The batch is the caller's until released, as a whole
 * or packet by packet. */
PKTIPC_API PKTIPC_WARN_UNUSED_RESULT
int pktipc_next_batch(pktipc_client *c, struct pktipc_batch *b, int timeout_ms);

/* The bytes (caplen of them) of a packet given to this client; NULL for a
 * pointer that is not one. Valid until the packet is released. */
PKTIPC_API const uint8_t *pktipc_pkt_data(const pktipc_client *c, const struct pktipc_pkt *p);

/* The bytes of a packet of batch b: pktipc_pkt_data without the lookup,
 * for loops over a batch. */
static inline const uint8_t *pktipc_batch_data(const struct pktipc_batch *b,
                                               const struct pktipc_pkt *p)
{
    return b->base + p->data_off;
}

/* The sequence number of pkts[i] of batch b. */
static inline uint64_t pktipc_batch_seq(const struct pktipc_batch *b, uint32_t i)
{
    return b->seq + (b->index ? b->index[i] : i);
}

/* Gives one packet back: 0, -PKTIPC_EALREADY, -PKTIPC_EFOREIGN. Any order,
 * any thread. A packet is known by the address it was given at (&b.pkts[i],
 * a copy for a share), so a packet released twice is seen as such only
 * until its slab comes back to this client with new packets. */
PKTIPC_API int pktipc_release(pktipc_client *c, const struct pktipc_pkt *p);

/* Gives back every packet of the batch not released yet: 0,
 * -PKTIPC_EALREADY (nothing was left), -PKTIPC_EFOREIGN. Any thread. */
PKTIPC_API int pktipc_release_batch(pktipc_client *c, struct pktipc_batch *b);

typedef void (*pktipc_handler)(void *user, const struct pktipc_pkt *p, const uint8_t *data);

/* As pcap_dispatch: calls cb for each packet of the batch at hand, at most
 * max of them (max <= 0: the rest of the batch), waiting at most timeout_ms
 * (<0: for ever) for a batch if none is at hand. Packets are valid until
 * the callback returns; they are released by the library (do not release
 * them). Returns the packets handled (>0), 0 if none came in time, or
 * -PKTIPC_E*. */
PKTIPC_API PKTIPC_WARN_UNUSED_RESULT
int pktipc_dispatch(pktipc_client *c, int max, pktipc_handler cb, void *user, int timeout_ms);

/* This client's counters, and the broker's from its segment, into the
 * first `sz` bytes of *st (sizeof(struct pktipc_stats) of the headers built
 * against). Never waits: it only reads what has arrived. 0, or
 * -PKTIPC_EINVAL, -PKTIPC_EBUSY. */
PKTIPC_API int pktipc_stats(pktipc_client *c, struct pktipc_stats *st, size_t sz);
/* The group this client is a member of, as the broker named it (NULL for
 * NULL), and how the group divides its packets: PKTIPC_BALANCE_FLOW or
 * PKTIPC_BALANCE_ROUND_ROBIN, as its first member chose (with
 * PKTIPC_BALANCE_DEFAULT, a broker that takes the place of a lost one may
 * have the other), or -PKTIPC_EINVAL for NULL. For the consuming thread. */
PKTIPC_API const char *pktipc_group(const pktipc_client *c);
PKTIPC_API int pktipc_balance(const pktipc_client *c);

/* The current broker's sources (capture files, interfaces), which a
 * packet's iface indexes: their number, and each (NULL past the end). */
PKTIPC_API unsigned pktipc_iface_count(const pktipc_client *c);
PKTIPC_API const struct pktipc_iface *pktipc_iface(const pktipc_client *c, unsigned i);

/* Room for a frame of `len` bytes to send out of interface `iface` (an
 * index into pktipc_iface): 0 with *frame pointing at it, in this client's
 * TX area, or -PKTIPC_E*. The first call offers the area to the broker:
 * -PKTIPC_EREFUSED if it does not send for this client (pktipc_geterr says
 * why). -PKTIPC_EINVAL for a length the interface does not send (0, or
 * more than its MTU and link-layer header allow). When every slot waits
 * for the broker, waits at most timeout_ms (<0: for ever) for one, then
 * -PKTIPC_EAGAIN. A frame not sent is given back by the next call. */
PKTIPC_API PKTIPC_WARN_UNUSED_RESULT
int pktipc_tx_alloc(pktipc_client *c, uint32_t len, unsigned iface, int timeout_ms,
                    uint8_t **frame);

/* Queues the frame pktipc_tx_alloc gave last, its first `len` bytes (at
 * most what was allocated); it is the broker's from then on. Handed over
 * by pktipc_tx_flush (or once an eighth of the slots wait). 0, or
 * -PKTIPC_EINVAL for another pointer or length. */
PKTIPC_API int pktipc_tx_send(pktipc_client *c, const uint8_t *frame, uint32_t len);

/* Hands every queued frame to the broker, in one message, then waits at
 * most timeout_ms (<0: for ever; 0: not at all) until the broker has
 * answered for each frame handed over. Returns how many still wait for its
 * answer (0: none), -PKTIPC_EREFUSED once every frame is answered if some
 * were refused since the last such report (pktipc_geterr says why,
 * pktipc_stats how many), or another -PKTIPC_E*. */
PKTIPC_API int pktipc_tx_flush(pktipc_client *c, int timeout_ms);

/* One line for an error code (negative or not). */
PKTIPC_API const char *pktipc_strerror(int err);

/* The last error of the consuming thread, in detail ("broker 'tap' evicted
 * 'ids': ..."); after -PKTIPC_EEOS, why the stream ended early ("" if it
 * did not: every packet was served). */
PKTIPC_API const char *pktipc_geterr(const pktipc_client *c);

/* The DLT_* value (what libpcap's pcap_open_dead takes) of a LINKTYPE_*
 * value (what descriptors and capture files carry). */
PKTIPC_API int pktipc_linktype_to_dlt(int linktype);

/* The library's version, "MAJOR.MINOR.PATCH" (the soname says when its ABI broke). */
PKTIPC_API const char *pktipc_version(void);

#ifdef __cplusplus
}
#endif

#endif /* PKTIPC_H */
