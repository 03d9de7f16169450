/* pktipc_shm.h's PKTIPC_INLINE helpers compiled as real symbols (liburing's
 * trick), for FFI users that cannot call an inline function. */
#define PKTIPC_INLINE   /* external definitions */
#include "pktipc_shm.h"
#include "pktipc_shm_ffi.h"
