/* The SIGBUS guard of sigbus.h. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "sigbus.h"

__thread sigjmp_buf *pkb_bus_guard;
static struct sigaction bus_before;
static pthread_once_t bus_once = PTHREAD_ONCE_INIT;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    (void)uc;
    if (pkb_bus_guard)
        siglongjmp(*pkb_bus_guard, 1);
    /* Not a read of ours: back to what was there, and the access that
     * faulted, run again, meets it. */
    sigaction(sig, &bus_before, NULL);
}

static void bus_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    /* SA_NODEFER: the signal stays unblocked, as sigsetjmp(…, 0) does not
     * restore the mask. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &bus_before);
}

void pkb_bus_install(void)
{
    pthread_once(&bus_once, bus_install);
}
