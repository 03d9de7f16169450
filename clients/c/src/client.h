/*
 * libpktipc's records, and what each of its parts calls in another; not
 * installed (pktipc.h is the library's interface). The parts: session.c,
 * the consuming thread's (socket, protocol, attaching, handing out);
 * release.c, any thread's (giving packets back, lock-free); api.c,
 * pktipc.h's functions over both.
 *
 * OWNERSHIP. The consuming thread (the one in pktipc_next_batch, _dispatch
 * or _stats, one at a time) owns the ZeroMQ socket, the protocol state, the
 * queue of pending batches and every field not marked (any). Any thread may
 * release packets: it touches only a slot's `done` bits and `words_left`,
 * the client's `done` stack and its eventfd, all atomic or thread-safe. A
 * slot whose last packet is released goes onto the `done` stack; the
 * consuming thread takes the stack whole and sends one RELEASE for it all.
 *
 * Copies. The user never gets a descriptor in the segment, which the
 * broker may write at any time: the slab's descriptors are copied into the
 * record's `share` area (a slab's slot there holds up to pkts_cap of them)
 * and checked when the BATCH comes; the share and the filter are chosen
 * over the copy, which then keeps only what is handed out (with its
 * indexes in the slab). A slot's `done` bits count positions in the copy,
 * and a packet is known by the copy's address.
 *
 * Mappings. Each broker's segment is a `struct map` record on a list that
 * only grows (records are reused, never freed before pktipc_close), so a
 * releasing thread may walk it without locks. A record's share area stays
 * with it, so its address range always means this record; `hi` is 0 while
 * the record is unused.
 *
 * Sending (tx.c) is the consuming thread's: the TX area (mapped read-write,
 * written only here), the slots queued and handed over, the broker's
 * answers.
 */
#ifndef PKTIPC_CLIENT_H
#define PKTIPC_CLIENT_H

#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <pcap/dlt.h>
#include <zmq.h>

#include "pktipc.h"
#include "pktipc_filter.h"
#include "proto.h"

#define NS_PER_MS       INT64_C(1000000)
#define LINGER_MS       1000                 /* for BYE to get out at close */
#define WORD_BITS       64
#define TX_FRAMES       1024                 /* a TX area's slots, by default */
#define TX_FRAME_SIZE   2048                 /* and bytes of a slot */

enum slot_state { SLOT_FREE, SLOT_PENDING, SLOT_HELD };

struct map;

struct slot {
    _Atomic uint32_t words_left;  /* (any) words of `done` not full yet; 0 unless held */
    uint32_t count;             /* packets given out */
    _Atomic uint64_t ticket;    /* which hand-out this is; 0: never held */
    uint64_t seq;
    int state;                  /* enum slot_state */
    struct map *map;
    _Atomic uint64_t *done;     /* (any) one bit per descriptor: released */
    struct slot *next_done;     /* on the client's stack of released slots */
};

struct map {
    _Atomic uintptr_t hi;       /* the slabs' end; 0 while the record is unused */
    uint8_t *base;              /* the mapping; NULL while unused */
    size_t size;
    uint64_t epoch;
    struct pktipc_header hdr;   /* the segment's header, checked, read once */
    uint32_t slab_count, slab_size;
    const uint8_t *slabs;
    uint32_t slots_cap, words_cap;                /* what the arrays hold, never less */
    uint32_t pkts_cap;          /* descriptors a slot's share can hold: words_cap bits */
    struct slot *slots;
    _Atomic uint64_t *bits;
    /* Shares: slots_cap * pkts_cap descriptors, then as many indexes; mapped
     * at the first share and kept for the record's life, so that its range
     * always means this record. */
    _Atomic(struct pktipc_pkt *) share;
    uint32_t *index;
    unsigned out;               /* slots the user holds */
    int orphan;                 /* its broker is gone: releases tell nobody */
    struct map *next;           /* set before the record is published, then fixed */
};

struct pending {
    uint64_t seq;
    uint32_t slab, n;
    uint32_t count;             /* this member's packets */
    int share;                  /* a share of the slab: indexes in the record's share area */
};

/* The TX area and where its slots stand: slot i (mod frames) is the
 * client's to write when i >= upto, until handed over. */
struct tx {
    uint8_t *base;
    size_t size;
    struct pktipc_tx_header h;  /* as written */
    char name[160];
    uint32_t *max_len;          /* per interface, from TX_READY (0: none) */
    uint32_t nlens;
    int ready;                  /* TX_READY came */
    uint64_t next;              /* slots queued (pktipc_tx_send), ever */
    uint64_t submitted;         /* slots handed to the broker, ever */
    uint64_t upto;              /* slots given back, ever */
    uint8_t *cur;               /* allocated, not queued yet */
    uint32_t cur_len;
    uint32_t batch;             /* hand over once this many are queued */
    uint64_t refused_unreported;
    char why[PKTIPC_ERRBUF_SIZE];   /* the last refusal's reason */
};

struct pktipc_client {
    char name[PROTO_NAME_MAX + 1];
    char group[PROTO_NAME_MAX + 1];
    const char *policy;
    const char *balance_asked;  /* NULL: the group's */
    int balance;                /* PKTIPC_BALANCE_*, from WELCOME */
    unsigned credit_asked;
    char *server;               /* as the user named it, for messages */
    char *endpoint;
    char *ipc_path;             /* NULL for tcp:// */
    int64_t owner;              /* the broker's uid (its socket's owner), -1 for tcp:// */
    int64_t owner_gid;          /* its socket's group, -1 for tcp:// */
    unsigned tx_frames, tx_frame_size;
    struct tx *tx;              /* NULL until the first pktipc_tx_alloc */
    uint64_t tx_submitted, tx_sent, tx_refused, tx_lost;

    void *zctx, *sock;
    int epfd, evfd, tfd;
    int64_t timer_armed;
    msgpack_sbuffer out;
    struct proto_msg msg;
    struct proto_conn conn;     /* the protocol, and reattaching to a broker after a lost one */
    const char *lost_why;       /* how the last broker was lost */

    char *filter_expr;          /* opts.filter, NULL if none */
    struct pktipc_filter *filter;   /* compiled for the current broker's sources */

    int sticky;                 /* -error every call returns from now on, 0 if none */
    int ended;                  /* END-OF-STREAM received */
    uint32_t credit;            /* the broker's, from WELCOME */

    _Atomic(struct map *) cur;
    _Atomic(struct map *) maps;
    struct pending *pend;
    unsigned pend_head, pend_len, pend_cap;
    unsigned held;              /* of the current broker: pending or out, not yet released */
    _Atomic(struct slot *) done;
    uint64_t *relq;             /* seqs to release */
    unsigned relq_len;
    uint64_t tickets;

    struct pktipc_batch disp;   /* pktipc_dispatch's batch at hand */
    uint32_t disp_next;
    int disp_active;

    uint64_t packets, bytes, batches, released, release_msgs, drops, gaps, filtered;
    /* Past the last packet a GAP of this epoch's broker counted: a GAP told
     * again (its connection was lost before the broker knew it came) is
     * counted once. */
    uint64_t gap_end, gap_epoch;
    atomic_flag busy;
    char err[PKTIPC_ERRBUF_SIZE];
    char eos_err[PKTIPC_ERRBUF_SIZE];   /* why the stream ended early, "" if it did not */
};

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* release.c: the records (any thread reads them) */
struct map *map_record(pktipc_client *c, uint32_t count, uint32_t size);
int map_share_area(struct map *m);
void map_free(struct map *m);
void map_retire(struct map *m);
struct slot *slot_of(const pktipc_client *c, const struct pktipc_pkt *p, uint32_t *i);

/* session.c: the consuming thread's */
__attribute__((format(printf, 3, 4)))
int fail(pktipc_client *c, int code, const char *fmt, ...);
__attribute__((format(printf, 3, 4)))
int die(pktipc_client *c, int code, const char *fmt, ...);
int setup(pktipc_client *c, const struct pktipc_opts *o);
void destroy(pktipc_client *c);
enum want { WANT_NOTHING, WANT_BATCH, WANT_WELCOME, WANT_TX_READY, WANT_TX_ROOM, WANT_TX_DONE };
int pump(pktipc_client *c, int64_t deadline, int want);
int hand_out(pktipc_client *c, struct pktipc_batch *b);
void take_released(pktipc_client *c);
int send_out(pktipc_client *c);

/* tx.c: the consuming thread's */
int tx_alloc(pktipc_client *c, uint32_t len, unsigned iface, int timeout_ms, uint8_t **frame);
int tx_send(pktipc_client *c, const uint8_t *frame, uint32_t len);
int tx_flush(pktipc_client *c, int timeout_ms);
int tx_wanted(const pktipc_client *c, int want);
int tx_on_ready(pktipc_client *c);
int tx_on_done(pktipc_client *c);
void tx_lost(pktipc_client *c);

#endif /* PKTIPC_CLIENT_H */
