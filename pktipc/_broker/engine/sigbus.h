/*
 * Reading a mapping whose file may shrink meanwhile (a capture file
 * truncated in place, a client's TX area): a page past the file's new end
 * raises SIGBUS. Whatever reads such a mapping does so under a guard:
 *
 *     sigjmp_buf jb;
 *     pkb_bus_install();
 *     if (sigsetjmp(jb, 0)) { pkb_bus_guard = NULL; ...the read ended... }
 *     pkb_bus_guard = &jb;
 *     ...read...
 *     pkb_bus_guard = NULL;
 *
 * and the signal then ends that read instead of the broker. A SIGBUS
 * outside a guard is handled as before the guard's handler was installed.
 * (Not read by cffi.)
 */
#ifndef PKB_SIGBUS_H
#define PKB_SIGBUS_H

#include <setjmp.h>

extern __thread sigjmp_buf *pkb_bus_guard;

/* Installs the handler, once per process. */
void pkb_bus_install(void);

#endif
