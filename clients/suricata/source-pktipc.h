/*
 * pktipc's capture plugin for Suricata 7: what plugin.c (set-up, run on
 * Suricata's main thread) and source-pktipc.c (the capture threads and the
 * release callback) share.
 */
#ifndef SOURCE_PKTIPC_H
#define SOURCE_PKTIPC_H

#include <stdatomic.h>
#include <stdbool.h>

#include <pktipc.h>

#define PKTIPC_PLUGIN_NAME "pktipc"
#define PKTIPC_MAX_THREADS 64                   /* pktipc's MAX_MEMBERS */

/* The settings, from --capture-plugin-args and the `pktipc:` section of
 * suricata.yaml, and the clients opened for them: one per receive thread. */
struct PktipcConf {
    char server[256];           /* broker name or control endpoint */
    char group[64];
    char prefix[48];            /* client i (from 1) is named <prefix>-<i> */
    char device[64];            /* Suricata's live device: the server's name */
    int threads;                /* 0: one per worker CPU (auto) */
    int policy;                 /* PKTIPC_POLICY_* */
    int balance;                /* PKTIPC_BALANCE_* */
    unsigned credit;            /* 0: the broker's default */
    int timeout_ms;             /* for attaching */
    int reconnect_ms;           /* looking for a broker that takes a lost one's place */
    int checksum_mode;          /* ChecksumValidationMode */

    /* Filled by the run mode, before the capture threads start. */
    int nclients;
    pktipc_client *clients[PKTIPC_MAX_THREADS];
    bool offline;               /* every source is a file: Suricata's time is the packets' */
    atomic_int next_thread;     /* which client the next capture thread takes */
    atomic_int finished;        /* capture threads that saw the end of the stream */
};

extern struct PktipcConf pktipc_conf;

/* plugin.c */
void PktipcFatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* source-pktipc.c */
void PktipcRegisterModules(int receive_slot, int decode_slot);
extern int pktipc_receive_slot;

#endif /* SOURCE_PKTIPC_H */
