/*
 * pktipc's capture plugin for Suricata 7: registration, settings, the run
 * modes, and the checks that this build matches the Suricata that loads it.
 * All of it runs on Suricata's main thread before any capture thread starts;
 * source-pktipc.c is what the capture threads run.
 *
 *   suricata --capture-plugin=pktipc --capture-plugin-args=server=tap,threads=2 \
 *            --set plugins.0=/path/to/pktipc.so --runmode workers ...
 */
#include "suricata-common.h"
#include "suricata-plugin.h"
#include "conf.h"
#include "decode.h"
#include "runmodes.h"
#include "threadvars.h"
#include "tm-modules.h"
#include "tm-threads.h"
#include "tmqh-packetpool.h"
#include "util-cpu.h"
#include "util-device.h"
#include "util-runmodes.h"
#include "util-time.h"

#include "source-pktipc.h"

struct PktipcConf pktipc_conf;

void PktipcFatal(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    SCLogError("%s", msg);   /* Suricata names the module: "pktipc: ..." */
    exit(EXIT_FAILURE);
}

/* --- settings ------------------------------------------------------------------------ */

static void Copy(char *dst, size_t size, const char *key, const char *val)
{
    if (strlen(val) >= size || !*val)
        PktipcFatal("%s must have 1 to %zu characters, not '%s'", key, size - 1, val);
    strlcpy(dst, val, size);
}

static long Number(const char *key, const char *val, long min, long max)
{
    char *end;
    errno = 0;
    long n = strtol(val, &end, 10);
    if (errno || end == val || *end || n < min || n > max)
        PktipcFatal("%s must be a number from %ld to %ld, not '%s'", key, min, max, val);
    return n;
}

static void Set(struct PktipcConf *c, const char *key, const char *val, const char *where)
{
    if (!strcmp(key, "server")) {
        Copy(c->server, sizeof c->server, key, val);
    } else if (!strcmp(key, "group")) {
        Copy(c->group, sizeof c->group, key, val);
    } else if (!strcmp(key, "prefix")) {
        Copy(c->prefix, sizeof c->prefix, key, val);
    } else if (!strcmp(key, "threads")) {
        c->threads = strcmp(val, "auto") ? (int)Number(key, val, 1, PKTIPC_MAX_THREADS) : 0;
    } else if (!strcmp(key, "policy")) {
        if (!strcmp(val, "drop"))
            c->policy = PKTIPC_POLICY_DROP;
        else if (!strcmp(val, "block"))
            c->policy = PKTIPC_POLICY_BLOCK;
        else
            PktipcFatal("policy must be drop or block, not '%s'", val);
    } else if (!strcmp(key, "balance")) {
        if (!strcmp(val, "flow"))
            c->balance = PKTIPC_BALANCE_FLOW;
        else if (!strcmp(val, "round-robin"))
            c->balance = PKTIPC_BALANCE_ROUND_ROBIN;
        else
            PktipcFatal("balance must be flow or round-robin, not '%s'", val);
    } else if (!strcmp(key, "credit")) {
        c->credit = (unsigned)Number(key, val, 1, 1 << 20);
    } else if (!strcmp(key, "timeout")) {
        c->timeout_ms = (int)Number(key, val, 0, 3600) * 1000;
    } else if (!strcmp(key, "reconnect")) {
        /* 0: for ever, as a capture interface that goes down and comes back */
        long s = Number(key, val, 0, INT_MAX / 1000);
        c->reconnect_ms = s ? (int)(s * 1000) : INT_MAX;
    } else if (!strcmp(key, "checksum-checks")) {
        if (!strcmp(val, "auto"))
            c->checksum_mode = CHECKSUM_VALIDATION_AUTO;
        else if (!strcmp(val, "yes"))
            c->checksum_mode = CHECKSUM_VALIDATION_ENABLE;
        else if (!strcmp(val, "no"))
            c->checksum_mode = CHECKSUM_VALIDATION_DISABLE;
        else
            PktipcFatal("checksum-checks must be yes, no or auto, not '%s'", val);
    } else {
        PktipcFatal("unknown setting '%s' in %s (known: server, group, prefix, threads, "
                    "policy, balance, credit, timeout, reconnect, checksum-checks)", key, where);
    }
}

/* The `pktipc:` section of suricata.yaml first, then the plugin's arguments
 * ("SERVER" or "server=SERVER", then key=value pairs, comma-separated), which
 * win. */
static void ParseSettings(struct PktipcConf *c, const char *args)
{
    *c = (struct PktipcConf){
        .group = "suricata", .policy = PKTIPC_POLICY_DROP, .timeout_ms = 5000,
        .reconnect_ms = INT_MAX, .checksum_mode = CHECKSUM_VALIDATION_AUTO,
    };
    ConfNode *section = ConfGetNode(PKTIPC_PLUGIN_NAME);
    if (section) {
        ConfNode *child;
        TAILQ_FOREACH (child, &section->head, next)
            Set(c, child->name, child->val ? child->val : "", "the pktipc section of suricata.yaml");
    }
    char buf[2048];
    if (args && strlen(args) >= sizeof buf)
        PktipcFatal("--capture-plugin-args is too long");
    strlcpy(buf, args ? args : "", sizeof buf);
    char *save = NULL;
    bool first = true;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        if (!eq && first) {
            Set(c, "server", item, "--capture-plugin-args");
        } else if (!eq) {
            PktipcFatal("'%s' in --capture-plugin-args is not key=value", item);
        } else {
            *eq = '\0';
            Set(c, item, eq + 1, "--capture-plugin-args");
        }
        first = false;
    }
    if (!*c->server)
        PktipcFatal("no broker given: --capture-plugin-args=server=NAME (a `pktipc serve "
                    "--name NAME`), or pktipc.server in suricata.yaml");
    if (!*c->prefix)
        strlcpy(c->prefix, c->group, sizeof c->prefix);
    /* The live device names the broker in Suricata's logs and stats. */
    const char *slash = strrchr(c->server, '/');
    strlcpy(c->device, slash ? slash + 1 : c->server, sizeof c->device);
}

/* --- this build against the running Suricata ------------------------------------------ */

/* The plugin is compiled against Suricata's source, configured here, while
 * the binary was configured by its packager: a struct whose layout depends on
 * configure's choices (Packet's capture union grows with DPDK, NFQ, AF_XDP
 * ...) would be read at the wrong offsets. The binary's own functions write
 * the fields this plugin uses, and the plugin reads them back. */
static void CheckLayout(void)
{
    static uint8_t probe[96];
    const char *bad = NULL;
    for (size_t i = 0; i < sizeof probe; i++)
        probe[i] = (uint8_t)(i * 37 + 1);

    Packet *p = PacketGetFromAlloc();
    if (p == NULL)
        PktipcFatal("out of memory");
    if (p->ReleasePacket != PacketFree)
        bad = "Packet.ReleasePacket";
    else if (PacketCopyData(p, probe, 16) != 0 || p->ext_pkt != NULL || GET_PKT_LEN(p) != 16 ||
             memcmp((uint8_t *)(p + 1), probe, 16) != 0)
        bad = "sizeof(Packet) or Packet.pktlen";
    else if (PacketSetData(p, probe, sizeof probe) != 0 || p->ext_pkt != probe ||
             GET_PKT_LEN(p) != sizeof probe || !(p->flags & PKT_ZERO_COPY))
        bad = "Packet.ext_pkt or Packet.flags";
    PacketFree(p);

    union {
        ThreadVars tv;
        uint8_t raw[sizeof(ThreadVars) + 256];
    } scratch;
    memset(&scratch, 0, sizeof scratch);
    TmThreadsSetFlag(&scratch.tv, THV_USE);
    if (!bad && SC_ATOMIC_GET(scratch.tv.flags) != THV_USE)
        bad = "ThreadVars.flags";
    if (!bad && (TmModuleGetByName("FlowWorker") != &tmm_modules[TMM_FLOWWORKER] ||
                 TmModuleGetByName("ReceivePktipc") != &tmm_modules[pktipc_receive_slot]))
        bad = "TmModule";

    if (bad)
        PktipcFatal("this pktipc.so does not match the running Suricata %s (%s differs): "
                    "rebuild it with `make -C clients/suricata` against this Suricata's source",
                    PACKAGE_VERSION, bad);
}

/* --- attaching ------------------------------------------------------------------------ */

static const char *Hint(int err)
{
    switch (err) {
        case -PKTIPC_ENOBROKER:
            return "; start it (pktipc serve --name ...), or run Suricata with the broker's "
                   "user and PKTIPC_RUNTIME_DIR";
        case -PKTIPC_EPERM:
            return "; run Suricata as the broker's user, or the broker with --allow-group";
        case -PKTIPC_ENAMETAKEN:
            return "; another client has that name: stop it, or pass prefix=OTHER";
        case -PKTIPC_EBALANCE:
            return "; the group's members balance the other way: pass balance= as they do, "
                   "or another group=";
        case -PKTIPC_EGROUP:
            return "; the broker keeps that name in another group for now: pass that group= "
                   "or another prefix=";
        default:
            return "";
    }
}

/* One client per capture thread, all attached before any thread starts, so
 * that a broker that is absent or refuses is one error line and no thread. */
static void OpenClients(struct PktipcConf *c, int n)
{
    for (int i = 0; i < n; i++) {
        char name[64], err[PKTIPC_ERRBUF_SIZE] = "";
        snprintf(name, sizeof name, "%s-%d", c->prefix, i + 1);
        struct pktipc_opts o = {
            .sz = sizeof o, .server = c->server, .name = name, .group = c->group,
            .policy = c->policy, .credit = c->credit, .timeout_ms = c->timeout_ms,
            .reconnect_ms = c->reconnect_ms, .errbuf = err, .balance = c->balance,
        };
        int r = pktipc_open(&o, &c->clients[i]);
        if (r < 0) {
            for (int j = 0; j < i; j++)
                pktipc_close(c->clients[j]);
            PktipcFatal("cannot attach to broker '%s' as '%s' in group '%s': %s%s", c->server,
                        name, c->group, *err ? err : pktipc_strerror(r), Hint(r));
        }
    }
    c->nclients = n;
    c->offline = pktipc_iface_count(c->clients[0]) > 0;
    for (unsigned i = 0; i < pktipc_iface_count(c->clients[0]); i++)
        if (pktipc_iface(c->clients[0], i)->kind != PKTIPC_IFACE_FILE)
            c->offline = false;
    SCLogNotice("%d member%s of group '%s' on broker '%s' (%s sources)", n, n > 1 ? "s" : "",
              pktipc_group(c->clients[0]), c->server,
              c->offline ? "file" : "live");
}

/* --- run modes ------------------------------------------------------------------------- */

static void *ConfigParser(const char *dev)
{
    (void)dev;
    return &pktipc_conf;
}

static int ThreadsCount(void *conf)
{
    return ((struct PktipcConf *)conf)->nclients;
}

enum { MODE_SINGLE, MODE_AUTOFP, MODE_WORKERS };

static int Start(int mode)
{
    struct PktipcConf *c = &pktipc_conf;
    CheckLayout();
    int n = c->threads ? c->threads : UtilCpuGetNumProcessorsOnline();
    if (mode == MODE_SINGLE)
        n = 1;
    if (mode == MODE_WORKERS && n > TmThreadsGetWorkerThreadMax()) {
        SCLogWarning("%d threads asked for, Suricata runs %d workers here "
                     "(threading.detect-thread-ratio): %d members", n,
                     TmThreadsGetWorkerThreadMax(), TmThreadsGetWorkerThreadMax());
        n = TmThreadsGetWorkerThreadMax();
    }
    if (n > PKTIPC_MAX_THREADS)
        n = PKTIPC_MAX_THREADS;
    OpenClients(c, n);
    if (c->offline)
        TimeModeSetOffline();       /* as `suricata -r`: time is the packets' time */
    else
        TimeModeSetLive();

    int r;
    if (mode == MODE_WORKERS)
        r = RunModeSetLiveCaptureWorkers(ConfigParser, ThreadsCount, "ReceivePktipc",
                                         "DecodePktipc", thread_name_workers, NULL);
    else if (mode == MODE_AUTOFP)
        r = RunModeSetLiveCaptureAutoFp(ConfigParser, ThreadsCount, "ReceivePktipc",
                                        "DecodePktipc", thread_name_autofp, NULL);
    else
        r = RunModeSetLiveCaptureSingle(ConfigParser, ThreadsCount, "ReceivePktipc",
                                        "DecodePktipc", thread_name_single, NULL);
    if (r != 0)
        PktipcFatal("Suricata could not start the capture threads");
    return 0;
}

static int RunModeWorkers(void)
{
    return Start(MODE_WORKERS);
}

static int RunModeAutoFp(void)
{
    return Start(MODE_AUTOFP);
}

static int RunModeSingle(void)
{
    return Start(MODE_SINGLE);
}

static const char *DefaultMode(void)
{
    return "workers";
}

/* --- registration ------------------------------------------------------------------------ */

static void InitCapture(const char *args, int plugin_slot, int receive_slot, int decode_slot)
{
    ParseSettings(&pktipc_conf, args);
    if (LiveRegisterDevice(pktipc_conf.device) < 0)
        PktipcFatal("cannot register the live device '%s'", pktipc_conf.device);
    RunModeRegisterNewRunMode(plugin_slot, "workers",
                              "Workers: each thread a member of the pktipc group, from capture "
                              "to logging", RunModeWorkers, NULL);
    RunModeRegisterNewRunMode(plugin_slot, "autofp",
                              "Receive threads, each a member of the pktipc group, hand flows "
                              "to detection threads", RunModeAutoFp, NULL);
    RunModeRegisterNewRunMode(plugin_slot, "single", "One thread, one member", RunModeSingle,
                              NULL);
    PktipcRegisterModules(receive_slot, decode_slot);
}

static void Init(void)
{
    static SCCapturePlugin capture = {
        .name = PKTIPC_PLUGIN_NAME, .Init = InitCapture, .GetDefaultMode = DefaultMode,
    };
    SCPluginRegisterCapture(&capture);
}

static SCPlugin registration = {
    .name = PKTIPC_PLUGIN_NAME,
    .license = "BSD-2-Clause",
    .author = "pktipc",
    .Init = Init,
};

__attribute__((visibility("default"))) SCPlugin *SCPluginRegister(void);
SCPlugin *SCPluginRegister(void)
{
    return &registration;
}
