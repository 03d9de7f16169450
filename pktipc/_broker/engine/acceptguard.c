/* libzmq's accept() under a limit on open files: see acceptguard.h. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "acceptguard.h"

static uint64_t emfile;

static void full(void)
{
    const struct timespec ms = {0, 1000000};
    __atomic_add_fetch(&emfile, 1, __ATOMIC_RELAXED);
    nanosleep(&ms, NULL);       /* libzmq retries at once: let refusals close some */
    errno = ENFILE;
}

static int guarded_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    int s = accept4(fd, addr, len, flags);
    if (s < 0 && errno == EMFILE)
        full();
    return s;
}

static int guarded_accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    int s = accept(fd, addr, len);
    if (s < 0 && errno == EMFILE)
        full();
    return s;
}

#if defined(__x86_64__)
#define SLOT_TYPES(t) ((t) == R_X86_64_JUMP_SLOT || (t) == R_X86_64_GLOB_DAT)
#elif defined(__aarch64__)
#define SLOT_TYPES(t) ((t) == R_AARCH64_JUMP_SLOT || (t) == R_AARCH64_GLOB_DAT)
#else
#define SLOT_TYPES(t) 0         /* not guarded elsewhere */
#endif

struct walk {
    int changed;
    int failed;
};

/* glibc relocates the pointers of a loaded object's dynamic section in
 * place; other loaders leave them relative to the load address. */
static uintptr_t absolute(const struct dl_phdr_info *info, uintptr_t p)
{
    return p < info->dlpi_addr ? p + info->dlpi_addr : p;
}

static int is_libzmq(const char *path)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    return strncmp(base, "libzmq", 6) == 0;
}

static void patch(struct dl_phdr_info *info, const ElfW(Rela) *rel, size_t n,
                  const ElfW(Sym) *symtab, const char *strtab,
                  uintptr_t relro, size_t relro_len, struct walk *w)
{
    long page = sysconf(_SC_PAGESIZE);
    for (size_t i = 0; i < n; i++) {
        if (!SLOT_TYPES(ELF64_R_TYPE(rel[i].r_info)))
            continue;
        const char *name = strtab + symtab[ELF64_R_SYM(rel[i].r_info)].st_name;
        void *to;
        if (strcmp(name, "accept4") == 0)
            to = (void *)guarded_accept4;
        else if (strcmp(name, "accept") == 0)
            to = (void *)guarded_accept;
        else
            continue;
        void **slot = (void **)(info->dlpi_addr + rel[i].r_offset);
        if (*slot == to) {
            w->changed++;
            continue;
        }
        uintptr_t at = (uintptr_t)slot;
        int ro = at >= relro && at < relro + relro_len;    /* read-only after start */
        void *pg = (void *)(at & ~(uintptr_t)(page - 1));
        if (ro && mprotect(pg, (size_t)page, PROT_READ | PROT_WRITE) != 0) {
            w->failed++;
            continue;
        }
        __atomic_store_n(slot, to, __ATOMIC_SEQ_CST);
        if (ro)
            mprotect(pg, (size_t)page, PROT_READ);
        w->changed++;
    }
}

static int visit(struct dl_phdr_info *info, size_t size, void *data)
{
    struct walk *w = data;
    if (!info->dlpi_name || !is_libzmq(info->dlpi_name))
        return 0;
    const ElfW(Dyn) *dyn = NULL;
    uintptr_t relro = 0;
    size_t relro_len = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(info->dlpi_addr + ph->p_vaddr);
        else if (ph->p_type == PT_GNU_RELRO) {
            relro = info->dlpi_addr + ph->p_vaddr;
            relro_len = ph->p_memsz;
        }
    }
    if (!dyn)
        return 0;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *jmprel = NULL, *rela = NULL;
    size_t jmprel_sz = 0, rela_sz = 0;
    int pltrel = DT_RELA;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = (const void *)absolute(info, dyn->d_un.d_ptr); break;
        case DT_STRTAB: strtab = (const void *)absolute(info, dyn->d_un.d_ptr); break;
        case DT_JMPREL: jmprel = (const void *)absolute(info, dyn->d_un.d_ptr); break;
        case DT_RELA: rela = (const void *)absolute(info, dyn->d_un.d_ptr); break;
        case DT_PLTRELSZ: jmprel_sz = dyn->d_un.d_val; break;
        case DT_RELASZ: rela_sz = dyn->d_un.d_val; break;
        case DT_PLTREL: pltrel = (int)dyn->d_un.d_val; break;
        }
    }
    if (!symtab || !strtab)
        return 0;
    if (jmprel && pltrel == DT_RELA)
        patch(info, jmprel, jmprel_sz / sizeof *jmprel, symtab, strtab, relro, relro_len, w);
    if (rela)
        patch(info, rela, rela_sz / sizeof *rela, symtab, strtab, relro, relro_len, w);
    return 0;
}

int pkb_accept_guard(void)
{
    struct walk w = {0, 0};
    dl_iterate_phdr(visit, &w);
    return w.failed ? -1 : w.changed;
}

uint64_t pkb_accept_emfile(void)
{
    return __atomic_load_n(&emfile, __ATOMIC_RELAXED);
}
