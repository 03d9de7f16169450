/*
 * The capture threads of pktipc's Suricata plugin, and the release callback.
 *
 * Each receive thread is one member of a pktipc group. It hands every packet
 * of its share to Suricata in place: the Packet's data points into the
 * broker's read-only mapping, and the packet's descriptor rides in the
 * Packet's plugin area. Suricata calls ReleasePacket when it is done with the
 * packet, on whatever thread (in autofp a detection thread), in any order;
 * that gives the packet back to pktipc, which returns a slab to the broker
 * once every packet of it is back.
 */
#include "suricata-common.h"
#include "suricata-plugin.h"
#include "suricata.h"
#include "decode.h"
#include "threadvars.h"
#include "tm-modules.h"
#include "tm-threads.h"
#include "tmqh-packetpool.h"
#include "util-checksum.h"
#include "util-device.h"

#include "source-pktipc.h"

#define POLL_MS 100             /* at most this long without capture-timeout handling */
#define STATS_NS 1000000000ull  /* Suricata's counters are brought up to date this often */
#define DRAIN_MS 10000          /* at exit, how long Suricata may take to give packets back */

int pktipc_receive_slot = -1;

typedef struct PktipcThread_ {
    ThreadVars *tv;
    TmSlot *slot;               /* the first slot after ours: decode */
    LiveDevice *livedev;
    pktipc_client *c;
    int index;                  /* 0: the first member, the one that also counts the
                                   broker's and the kernel's drops */
    char name[64];
    int checksum_mode;
    bool eos;

    /* Packets handed to Suricata and not given back yet. Written by any
     * thread; the capture thread waits for 0 before closing its client. */
    atomic_uint_fast64_t outstanding;
    atomic_uint_fast64_t release_errors;

    uint64_t base_packets, base_drops, base_reconnects; /* of clients closed before this one */
    uint64_t packets, oversize, unsupported;
    uint64_t source_drops;      /* index 0: the brokers' and the kernels' */
    uint64_t epoch, last_kernel_drops, last_broker_drops;
    uint64_t reported_drops;    /* added to the live device's drop count so far */
    uint64_t stats_at;

    uint16_t cnt_kernel_packets, cnt_kernel_drops, cnt_member_drops, cnt_source_drops,
            cnt_reconnects, cnt_oversize, cnt_unsupported, cnt_release_errors;
} PktipcThread;

/* In Packet.plugin_v: what ReleasePacket needs. The client, not the thread's
 * current one: a packet is given back to the client it came from. */
typedef struct PktipcPacketVars_ {
    PktipcThread *ptv;
    pktipc_client *c;
    const struct pktipc_pkt *pkt;
} PktipcPacketVars;

_Static_assert(sizeof(PktipcPacketVars) <= PLUGIN_VAR_SIZE, "Packet.plugin_v is too small");

static uint64_t NowNs(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The decoder for a DLT_* value, as Suricata's pcap file reader chooses it. */
static DecoderFunc Decoder(int datalink)
{
    switch (datalink) {
        case LINKTYPE_ETHERNET:
            return DecodeEthernet;
        case LINKTYPE_LINUX_SLL:
            return DecodeSll;
        case LINKTYPE_PPP:
            return DecodePPP;
        case LINKTYPE_IPV4:
        case LINKTYPE_IPV6:
        case LINKTYPE_RAW:
        case LINKTYPE_RAW2:
        case LINKTYPE_GRE_OVER_IP:
            return DecodeRaw;
        case LINKTYPE_NULL:
            return DecodeNull;
        case LINKTYPE_CISCO_HDLC:
            return DecodeCHDLC;
        default:
            return NULL;
    }
}

/* --- giving packets back --------------------------------------------------------------- */

static void ReleasePacket(Packet *p)
{
    PktipcPacketVars *v = (PktipcPacketVars *)p->plugin_v;
    if (v->pkt != NULL) {
        PktipcThread *ptv = v->ptv;
        if (pktipc_release(v->c, v->pkt) < 0)
            atomic_fetch_add_explicit(&ptv->release_errors, 1, memory_order_relaxed);
        v->pkt = NULL;
        /* Make sure the release is done before the capture thread may see 0
         * and close the client. */
        atomic_fetch_sub_explicit(&ptv->outstanding, 1, memory_order_release);
    }
    PacketFreeOrRelease(p);
}

/* --- counters ---------------------------------------------------------------------------- */

static void UpdateCounters(PktipcThread *ptv)
{
    struct pktipc_stats st;
    if (pktipc_stats(ptv->c, &st, sizeof(st)) < 0)
        return;
    if (ptv->index == 0) {
        /* The broker's counters are the current broker's own: a new one
         * starts again from 0. */
        if (st.epoch != ptv->epoch) {
            ptv->epoch = st.epoch;
            ptv->last_kernel_drops = ptv->last_broker_drops = 0;
        }
        if (st.kernel_drops >= ptv->last_kernel_drops)
            ptv->source_drops += st.kernel_drops - ptv->last_kernel_drops;
        if (st.broker_drops >= ptv->last_broker_drops)
            ptv->source_drops += st.broker_drops - ptv->last_broker_drops;
        ptv->last_kernel_drops = st.kernel_drops;
        ptv->last_broker_drops = st.broker_drops;
    }
    uint64_t member_drops = ptv->base_drops + st.drops;
    uint64_t drops = member_drops + ptv->source_drops;
    ThreadVars *tv = ptv->tv;
    StatsSetUI64(tv, ptv->cnt_kernel_packets, ptv->base_packets + st.packets + drops);
    StatsSetUI64(tv, ptv->cnt_kernel_drops, drops);
    StatsSetUI64(tv, ptv->cnt_member_drops, member_drops);
    StatsSetUI64(tv, ptv->cnt_source_drops, ptv->source_drops);
    StatsSetUI64(tv, ptv->cnt_reconnects, ptv->base_reconnects + st.reconnects);
    StatsSetUI64(tv, ptv->cnt_oversize, ptv->oversize);
    StatsSetUI64(tv, ptv->cnt_unsupported, ptv->unsupported);
    StatsSetUI64(tv, ptv->cnt_release_errors, atomic_load(&ptv->release_errors));
    if (drops > ptv->reported_drops) {
        (void)SC_ATOMIC_ADD(ptv->livedev->drop, drops - ptv->reported_drops);
        ptv->reported_drops = drops;
    }
    ptv->stats_at = NowNs();
}

/* --- the capture loop ---------------------------------------------------------------------- */

static void HandOver(PktipcThread *ptv, Packet *p, const struct pktipc_batch *b, uint32_t i)
{
    const struct pktipc_pkt *d = &b->pkts[i];
    PKT_SET_SRC(p, PKT_SRC_WIRE);
    p->ts = (SCTime_t){ .secs = d->ts_ns / 1000000000u,
                        .usecs = (d->ts_ns % 1000000000u) / 1000u };
    p->datalink = pktipc_linktype_to_dlt(d->linktype);
    p->livedev = ptv->livedev;
    if (pktipc_conf.offline)
        p->pcap_cnt = pktipc_batch_seq(b, i) + 1;   /* the packet's number in the stream */
    PktipcPacketVars *v = (PktipcPacketVars *)p->plugin_v;
    v->ptv = ptv;
    v->c = ptv->c;
    v->pkt = d;
    p->ReleasePacket = ReleasePacket;
    atomic_fetch_add_explicit(&ptv->outstanding, 1, memory_order_relaxed);
    (void)PacketSetData(p, pktipc_batch_data(b, d), d->caplen);
    (void)SC_ATOMIC_ADD(ptv->livedev->pkts, 1);

    switch (ptv->checksum_mode) {
        case CHECKSUM_VALIDATION_AUTO:
            if (ChecksumAutoModeCheck(ptv->packets, SC_ATOMIC_GET(ptv->livedev->pkts),
                                      SC_ATOMIC_GET(ptv->livedev->invalid_checksums))) {
                ptv->checksum_mode = CHECKSUM_VALIDATION_DISABLE;
                p->flags |= PKT_IGNORE_CHECKSUM;
            }
            break;
        case CHECKSUM_VALIDATION_DISABLE:
            p->flags |= PKT_IGNORE_CHECKSUM;
            break;
        default:
            break;
    }
}

static TmEcode Deliver(PktipcThread *ptv, struct pktipc_batch *b)
{
    for (uint32_t i = 0; i < b->count; i++) {
        const struct pktipc_pkt *d = &b->pkts[i];
        ptv->packets++;
        Packet *p = NULL;
        if (d->caplen > MAX_PAYLOAD_SIZE)
            ptv->oversize++;        /* more than Suricata takes (PacketCopyData refuses it) */
        else if (Decoder(pktipc_linktype_to_dlt(d->linktype)) == NULL)
            ptv->unsupported++;
        else
            p = PacketGetFromQueueOrAlloc();
        if (p == NULL) {
            (void)pktipc_release(ptv->c, d);
            continue;
        }
        HandOver(ptv, p, b, i);
        if (TmThreadsSlotProcessPkt(ptv->tv, ptv->slot, p) != TM_ECODE_OK) {
            while (++i < b->count)
                (void)pktipc_release(ptv->c, &b->pkts[i]);
            return TM_ECODE_FAILED;
        }
    }
    return TM_ECODE_OK;
}

/* Waits, still doing Suricata's timeout work, until every packet of this
 * thread's client is back; false if Suricata stopped first. */
static bool Drain(PktipcThread *ptv, int ms)
{
    for (int waited = 0; atomic_load_explicit(&ptv->outstanding, memory_order_acquire); waited++) {
        if (waited >= ms)
            return false;
        TmThreadsCaptureHandleTimeout(ptv->tv, NULL);
        usleep(1000);
    }
    return true;
}

/* The client cannot go on (evicted, or no broker came back in time): once
 * Suricata has given back its packets, a new client of the same name. */
static void Reattach(PktipcThread *ptv, int err)
{
    SCLogWarning("%s: %s; attaching again", ptv->name,
                 *pktipc_geterr(ptv->c) ? pktipc_geterr(ptv->c) : pktipc_strerror(err));
    while (!Drain(ptv, 1000))
        if (suricata_ctl_flags & SURICATA_STOP)
            return;
    struct pktipc_stats st;
    if (pktipc_stats(ptv->c, &st, sizeof(st)) == 0) {
        ptv->base_packets += st.packets;
        ptv->base_drops += st.drops;
        ptv->base_reconnects += st.reconnects + 1;
    }
    pktipc_close(ptv->c);
    ptv->c = NULL;
    const struct PktipcConf *c = &pktipc_conf;
    for (;;) {
        char errbuf[PKTIPC_ERRBUF_SIZE] = "";
        struct pktipc_opts o = {
            .sz = sizeof o, .server = c->server, .name = ptv->name, .group = c->group,
            .policy = c->policy, .credit = c->credit, .timeout_ms = 1000,
            .reconnect_ms = c->reconnect_ms, .errbuf = errbuf, .balance = c->balance,
        };
        if (pktipc_open(&o, &ptv->c) == 0) {
            SCLogNotice("%s attached again to '%s'", ptv->name,
                        c->server);
            return;
        }
        if (suricata_ctl_flags & SURICATA_STOP)
            return;
        TmThreadsCaptureHandleTimeout(ptv->tv, NULL);
        usleep(POLL_MS * 1000);
    }
}

static void EndOfStream(PktipcThread *ptv)
{
    const char *why = pktipc_geterr(ptv->c);
    if (*why)
        SCLogWarning("%s: the stream ended early: %s", ptv->name, why);
    else
        SCLogInfo("%s: end of stream", ptv->name);
    ptv->eos = true;
    /* As `suricata -r` at the end of its file, once every member is done. */
    if (atomic_fetch_add(&pktipc_conf.finished, 1) + 1 == pktipc_conf.nclients)
        EngineStop();
}

static TmEcode ReceiveLoop(ThreadVars *tv, void *data, void *slot)
{
    PktipcThread *ptv = data;
    ptv->slot = ((TmSlot *)slot)->slot_next;
    TmThreadsSetFlag(tv, THV_RUNNING);

    TmEcode ret = TM_ECODE_OK;
    while (!(suricata_ctl_flags & SURICATA_STOP)) {
        if (ptv->eos || ptv->c == NULL) {
            TmThreadsCaptureHandleTimeout(tv, NULL);
            usleep(POLL_MS * 1000);
            continue;
        }
        /* Wait for a free Packet rather than allocating at line rate. */
        PacketPoolWait();
        struct pktipc_batch b;
        int n = pktipc_next_batch(ptv->c, &b, POLL_MS);
        if (n > 0) {
            if (Deliver(ptv, &b) != TM_ECODE_OK) {
                ret = TM_ECODE_FAILED;
                break;
            }
        } else if (n == 0 || n == -PKTIPC_EINTR) {
            TmThreadsCaptureHandleTimeout(tv, NULL);
        } else if (n == -PKTIPC_EEOS) {
            EndOfStream(ptv);
        } else if (n == -PKTIPC_EGONE || n == -PKTIPC_EEVICTED || n == -PKTIPC_EPROTO) {
            Reattach(ptv, n);
        } else {
            SCLogError("%s: %s", ptv->name,
                       *pktipc_geterr(ptv->c) ? pktipc_geterr(ptv->c) : pktipc_strerror(n));
            ret = TM_ECODE_FAILED;
            break;
        }
        if (ptv->c && NowNs() - ptv->stats_at >= STATS_NS)
            UpdateCounters(ptv);
    }
    if (ptv->c)
        UpdateCounters(ptv);
    return ret;
}

/* --- thread life cycle ----------------------------------------------------------------------- */

static TmEcode ReceiveThreadInit(ThreadVars *tv, const void *initdata, void **data)
{
    struct PktipcConf *conf = (struct PktipcConf *)initdata;
    /* The real thread, as the binary laid it out. */
    if (tv->tm_slots == NULL || tv->tm_slots->tm_id != pktipc_receive_slot ||
        tv->tmqh_in != TmqhInputPacketpool)
        PktipcFatal("this pktipc.so does not match the running Suricata %s (ThreadVars "
                    "differs): rebuild it with `make -C clients/suricata`", PACKAGE_VERSION);
    int i = atomic_fetch_add(&conf->next_thread, 1);
    if (i >= conf->nclients)
        PktipcFatal("Suricata started more capture threads than members (%d)", conf->nclients);

    PktipcThread *ptv = SCCalloc(1, sizeof *ptv);
    if (ptv == NULL)
        PktipcFatal("out of memory");
    ptv->tv = tv;
    ptv->index = i;
    ptv->c = conf->clients[i];
    conf->clients[i] = NULL;
    snprintf(ptv->name, sizeof ptv->name, "%s-%d", conf->prefix, i + 1);
    ptv->checksum_mode = conf->checksum_mode;
    ptv->livedev = LiveGetDevice(conf->device);
    if (ptv->livedev == NULL)
        PktipcFatal("no live device '%s'", conf->device);
    atomic_init(&ptv->outstanding, 0);
    atomic_init(&ptv->release_errors, 0);

    /* What an operator watches for any capture method, then pktipc's own. */
    ptv->cnt_kernel_packets = StatsRegisterCounter("capture.kernel_packets", tv);
    ptv->cnt_kernel_drops = StatsRegisterCounter("capture.kernel_drops", tv);
    ptv->cnt_member_drops = StatsRegisterCounter("capture.pktipc.member_drops", tv);
    ptv->cnt_source_drops = StatsRegisterCounter("capture.pktipc.source_drops", tv);
    ptv->cnt_reconnects = StatsRegisterCounter("capture.pktipc.reconnects", tv);
    ptv->cnt_oversize = StatsRegisterCounter("capture.pktipc.oversize", tv);
    ptv->cnt_unsupported = StatsRegisterCounter("capture.pktipc.unsupported_linktype", tv);
    ptv->cnt_release_errors = StatsRegisterCounter("capture.pktipc.release_errors", tv);
    *data = ptv;
    return TM_ECODE_OK;
}

static void ReceiveThreadExitPrintStats(ThreadVars *tv, void *data)
{
    (void)tv;
    PktipcThread *ptv = data;
    SCLogPerf("%s: packets %" PRIu64 ", member drops %" PRIu64 ", source drops %" PRIu64
              ", too large %" PRIu64 ", link type unsupported %" PRIu64,
              ptv->name, ptv->packets,
              ptv->reported_drops - ptv->source_drops, ptv->source_drops, ptv->oversize,
              ptv->unsupported);
}

static TmEcode ReceiveThreadDeinit(ThreadVars *tv, void *data)
{
    (void)tv;
    PktipcThread *ptv = data;
    if (!Drain(ptv, DRAIN_MS)) {
        /* Unmapping packets Suricata still reads would crash it: leave them. */
        SCLogWarning("%s: %" PRIu64 " packets not given back; not detaching",
                     ptv->name, (uint64_t)atomic_load(&ptv->outstanding));
        return TM_ECODE_OK;
    }
    pktipc_close(ptv->c);
    SCFree(ptv);
    return TM_ECODE_OK;
}

static TmEcode DecodeThreadInit(ThreadVars *tv, const void *initdata, void **data)
{
    (void)initdata;
    DecodeThreadVars *dtv = DecodeThreadVarsAlloc(tv);
    if (dtv == NULL)
        return TM_ECODE_FAILED;
    DecodeRegisterPerfCounters(dtv, tv);
    *data = dtv;
    return TM_ECODE_OK;
}

static TmEcode DecodeThreadDeinit(ThreadVars *tv, void *data)
{
    if (data != NULL)
        DecodeThreadVarsFree(tv, data);
    return TM_ECODE_OK;
}

static TmEcode Decode(ThreadVars *tv, Packet *p, void *data)
{
    DecodeThreadVars *dtv = data;
    DecodeUpdatePacketCounters(tv, dtv, p);
    Decoder(p->datalink)(tv, dtv, p, GET_PKT_DATA(p), GET_PKT_LEN(p));
    PacketDecodeFinalize(tv, dtv, p);
    return TM_ECODE_OK;
}

void PktipcRegisterModules(int receive_slot, int decode_slot)
{
    pktipc_receive_slot = receive_slot;
    TmModule *r = &tmm_modules[receive_slot];
    r->name = "ReceivePktipc";
    r->ThreadInit = ReceiveThreadInit;
    r->PktAcqLoop = ReceiveLoop;
    r->ThreadExitPrintStats = ReceiveThreadExitPrintStats;
    r->ThreadDeinit = ReceiveThreadDeinit;
    r->cap_flags = 0;
    r->flags = TM_FLAG_RECEIVE_TM;

    TmModule *d = &tmm_modules[decode_slot];
    d->name = "DecodePktipc";
    d->ThreadInit = DecodeThreadInit;
    d->Func = Decode;
    d->ThreadDeinit = DecodeThreadDeinit;
    d->cap_flags = 0;
    d->flags = TM_FLAG_DECODE_TM;
}
