/*
 * A guard for libzmq's ipc:// listener: declarations only (cffi's cdef()
 * reads this file as it is).
 *
 * libzmq's ipc listener (4.3.5, and its master as of 2026) aborts the whole
 * process when accept() fails with EMFILE: its check lets ENFILE, EAGAIN
 * and the like through, but not EMFILE (its tcp listener lets both
 * through). Its I/O thread accepts connections before the broker's ZAP
 * handler can refuse them, so a flood of connections up to the limit on
 * open files would kill the broker.
 *
 * pkb_accept_guard() points libzmq's own references to accept4() and
 * accept() (its GOT slots) at a wrapper that turns EMFILE into ENFILE after
 * a millisecond's pause. libzmq then leaves the connection waiting in the
 * listen backlog and tries again, by which time refusals have freed
 * descriptors. Returns how many slots now point at the wrapper (0: no
 * libzmq loaded), or -1 when a slot could not be made writable.
 */

int pkb_accept_guard(void);

/* Accepts that found the file table full, since the process started. */
uint64_t pkb_accept_emfile(void);
