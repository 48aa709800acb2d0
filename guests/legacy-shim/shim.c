/*
 * migstall dirty-log shim (LD_PRELOAD into QEMU).
 *
 * Interposes ioctl().  Always: logs the dirty-log related KVM ioctls QEMU
 * makes (capability checks and enables, the first KVM_CLEAR_DIRTY_LOG as it
 * happens, and counts of GET/CLEAR_DIRTY_LOG at exit), which is how migstall
 * proves which dirty-log mode a run really used.  Every line carries the pid;
 * a fork (QEMU's -daemonize forks twice before it touches KVM) logs a
 * "forked" line in the child, so the pid in QEMU's pidfile has a line saying
 * the shim is in it even before its first KVM ioctl.
 * With MIGSTALL_SHIM_HIDE_MANUAL=1 ("legacy" mode): answers 0 to
 * KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), on the /dev/kvm fd
 * and on the VM fd alike, so QEMU uses the classic bitmap without manual
 * protect (as QEMU 3.1 on Linux 5.0 did).
 *
 * TEST ONLY, the negative control of migstall's memory verification: with
 * MIGSTALL_SHIM_DROP_DIRTY=N (N >= 1) the shim clears every N-th set bit of
 * the bitmaps KVM_GET_DIRTY_LOG returns (one running count over all calls of
 * the process; N=1 clears them all), after the real ioctl, so QEMU never
 * learns that those pages were written and does not send them again.  At the
 * last bitmap sync of a migration (stop-and-copy, the guest paused) M dirty
 * pages lose at least floor(M/N) of their bits, and those pages keep on the
 * destination what an earlier pass sent: a guest that keeps writing its
 * memory (the probe's write loop) loses real writes, so the migrated RAM
 * differs.  It works in both bitmap modes: without manual protect ("legacy")
 * GET_DIRTY_LOG has already cleared and write-protected the pages, so a
 * dropped page is lost unless the guest writes it again; with manual protect
 * (KVM_CLEAR_DIRTY_LOG, QEMU's default) GET_DIRTY_LOG only reads KVM's bitmap
 * and QEMU clears what it sends, so a dropped bit stays set in KVM and comes
 * back at the next sync, and the loss happens at the last one.  The dirty
 * ring (ring mode) does not use GET_DIRTY_LOG: nothing is dropped there.  To
 * know a bitmap's length the shim records each memslot's size from
 * KVM_SET_USER_MEMORY_REGION(2).  Logs "drop_dirty ..." for the first calls
 * that dropped bits and totals on the exit line.
 *
 * Always, too: times every KVM_SET_USER_MEMORY_REGION(2) that changes only a
 * memslot's flags (same slot, address, size and host address as the slot's
 * last call), which is how QEMU turns dirty logging on and off, and logs
 * "memslot_flags slot=S flags=OLD->NEW ret=R dur_ns=D end_ns=E": D from
 * CLOCK_MONOTONIC around the real ioctl, E the CLOCK_REALTIME at its return
 * (the clock of QEMU's trace lines).  The log line is written after the
 * second reading, so it is not part of D.  migstall sums D into
 * kvm_ioctl_ms.
 *
 * Log: one line per event, appended to $MIGSTALL_SHIM_LOG (if set).
 * Constants are from <linux/kvm.h> (x86_64); no kernel headers needed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define KVM_CHECK_EXTENSION   0xAE03UL
#define KVM_ENABLE_CAP        0x4068AEA3UL
#define KVM_GET_DIRTY_LOG     0x4010AE42UL
#define KVM_CLEAR_DIRTY_LOG   0xC018AEC0UL
#define KVM_SET_USER_MEMORY_REGION  0x4020AE46UL
#define KVM_SET_USER_MEMORY_REGION2 0x40A0AE49UL
#define CAP_MANUAL_PROTECT2   168
#define CAP_DIRTY_LOG_RING    192
#define CAP_DIRTY_LOG_RING_ACQ_REL 223

struct enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; uint8_t pad[64]; };
/* the common head of kvm_userspace_memory_region and ..._region2 */
struct mem_region { uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
                    uint64_t userspace_addr; };
struct dirty_log { uint32_t slot; uint32_t padding1; union { uint64_t *dirty_bitmap; uint64_t padding2; }; };

#define KVM_PAGE 4096
#define MAX_SLOTS 1024          /* QEMU uses a few dozen memslots at most */
#define DROP_LOG_CALLS 16       /* "drop_dirty" lines logged per process */

typedef int (*ioctl_fn)(int, unsigned long, ...);
static ioctl_fn real_ioctl;
static int hide_manual;
static unsigned long n_get, n_clear;
static char log_path[4096];   /* $MIGSTALL_SHIM_LOG, read once (also used in the fork child) */

/* MIGSTALL_SHIM_DROP_DIRTY (test only): memslot sizes and the drop count, under drop_lock */
static unsigned long drop_every;
static pthread_mutex_t drop_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { int fd; uint32_t slot; uint64_t npages; struct mem_region r; } slots[MAX_SLOTS];
static int nslots;
static unsigned long long drop_seen, drop_dropped;
static unsigned long drop_calls, drop_unknown;

static void shim_log(const char *fmt, ...)
{
    const char *path = log_path;
    char buf[512];
    int n, fd;
    va_list ap;

    if (!*path)
        return;
    n = snprintf(buf, sizeof(buf), "migstall-shim pid=%d ", (int)getpid());
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof(buf) - 1)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        ssize_t w = write(fd, buf, n);
        (void)w;
        close(fd);
    }
}

static void shim_forked(void)
{
    shim_log("forked ppid=%d hide_manual=%d drop_dirty=%lu", (int)getppid(), hide_manual, drop_every);
}

static void remember_slot(int fd, const struct mem_region *r)
{
    int i;
    pthread_mutex_lock(&drop_lock);
    for (i = 0; i < nslots; i++)
        if (slots[i].fd == fd && slots[i].slot == r->slot)
            break;
    if (r->memory_size == 0) {                  /* slot deleted */
        if (i < nslots)
            slots[i] = slots[--nslots];
    } else if (i < nslots) {
        slots[i].npages = r->memory_size / KVM_PAGE;
        slots[i].r = *r;
    } else if (nslots < MAX_SLOTS) {
        slots[nslots].fd = fd;
        slots[nslots].slot = r->slot;
        slots[nslots].npages = r->memory_size / KVM_PAGE;
        slots[nslots].r = *r;
        nslots++;
    }
    pthread_mutex_unlock(&drop_lock);
}

/* The flags of memslot r->slot before this call, if the call changes only its
 * flags (a dirty-logging switch); -1 otherwise. */
static int64_t flags_only_change(int fd, const struct mem_region *r)
{
    int64_t old = -1;
    int i;
    pthread_mutex_lock(&drop_lock);
    for (i = 0; i < nslots; i++) {
        const struct mem_region *p = &slots[i].r;
        if (slots[i].fd == fd && slots[i].slot == r->slot && p->guest_phys_addr == r->guest_phys_addr &&
            p->memory_size == r->memory_size && p->userspace_addr == r->userspace_addr &&
            p->flags != r->flags) {
            old = p->flags;
            break;
        }
    }
    pthread_mutex_unlock(&drop_lock);
    return old;
}

static uint64_t ns_of(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Clear every drop_every-th set bit of a bitmap KVM_GET_DIRTY_LOG has just filled. */
static void drop_dirty_bits(int fd, const struct dirty_log *d)
{
    uint64_t npages = 0, w, words, i, set = 0, dropped = 0;
    int k, log_it = 0;

    pthread_mutex_lock(&drop_lock);
    for (k = 0; k < nslots; k++)
        if (slots[k].fd == fd && slots[k].slot == d->slot)
            npages = slots[k].npages;
    if (!npages || !d->dirty_bitmap) {
        if (drop_unknown++ == 0)
            shim_log("drop_dirty unknown slot=%#x fd=%d: bitmap length unknown, nothing dropped", d->slot, fd);
        pthread_mutex_unlock(&drop_lock);
        return;
    }
    words = (npages + 63) / 64;
    for (i = 0; i < words; i++) {
        w = d->dirty_bitmap[i];
        if (i == words - 1 && npages % 64)
            w &= (1ULL << (npages % 64)) - 1;   /* bits past the slot are not pages */
        while (w) {
            uint64_t bit = w & -w;
            w &= w - 1;
            set++;
            if (++drop_seen % drop_every == 0) {
                d->dirty_bitmap[i] &= ~bit;
                dropped++;
            }
        }
    }
    drop_dropped += dropped;
    if (dropped && drop_calls < DROP_LOG_CALLS) {
        drop_calls++;
        log_it = 1;
    }
    pthread_mutex_unlock(&drop_lock);
    if (log_it)
        shim_log("drop_dirty slot=%#x fd=%d set=%llu dropped=%llu every=%lu", d->slot, fd,
                 (unsigned long long)set, (unsigned long long)dropped, drop_every);
}

__attribute__((constructor)) static void shim_init(void)
{
    const char *h = getenv("MIGSTALL_SHIM_HIDE_MANUAL");
    const char *p = getenv("MIGSTALL_SHIM_LOG");
    const char *dd = getenv("MIGSTALL_SHIM_DROP_DIRTY");
    real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    hide_manual = h && strcmp(h, "1") == 0;
    int drop_bad = 0;
    if (dd && *dd) {
        char *end;
        unsigned long n = strtoul(dd, &end, 10);
        drop_bad = *end != '\0' || *dd == '-';
        drop_every = drop_bad ? 0 : n;
    }
    if (p && strlen(p) < sizeof(log_path))
        strcpy(log_path, p);
    pthread_atfork(NULL, NULL, shim_forked);
    shim_log("loaded hide_manual=%d drop_dirty=%lu", hide_manual, drop_every);
    if (drop_bad)
        shim_log("drop_dirty ignored: MIGSTALL_SHIM_DROP_DIRTY=%.40s is not a number", dd);
}

__attribute__((destructor)) static void shim_fini(void)
{
    if (drop_every)
        shim_log("exit get_dirty_log=%lu clear_dirty_log=%lu drop_dirty_seen=%llu drop_dirty_dropped=%llu",
                 __atomic_load_n(&n_get, __ATOMIC_RELAXED), __atomic_load_n(&n_clear, __ATOMIC_RELAXED),
                 drop_seen, drop_dropped);
    else
        shim_log("exit get_dirty_log=%lu clear_dirty_log=%lu",
                 __atomic_load_n(&n_get, __ATOMIC_RELAXED), __atomic_load_n(&n_clear, __ATOMIC_RELAXED));
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;
    int ret;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (!real_ioctl)
        real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");

    switch (request) {
    case KVM_CHECK_EXTENSION: {
        long cap = (long)arg;
        if (cap != CAP_MANUAL_PROTECT2 && cap != CAP_DIRTY_LOG_RING && cap != CAP_DIRTY_LOG_RING_ACQ_REL)
            break;
        ret = real_ioctl(fd, request, arg);
        if (cap == CAP_MANUAL_PROTECT2 && hide_manual) {
            shim_log("hid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 fd=%d kernel_answer=%d answered=0", fd, ret);
            return 0;
        }
        shim_log("check_extension cap=%ld fd=%d ret=%d", cap, fd, ret);
        return ret;
    }
    case KVM_ENABLE_CAP: {
        const struct enable_cap *c = arg;
        ret = real_ioctl(fd, request, arg);
        if (c && (c->cap == CAP_MANUAL_PROTECT2 || c->cap == CAP_DIRTY_LOG_RING ||
                  c->cap == CAP_DIRTY_LOG_RING_ACQ_REL))
            shim_log("enable_cap cap=%u args0=%#llx fd=%d ret=%d", c->cap,
                     (unsigned long long)c->args[0], fd, ret);
        return ret;
    }
    case KVM_SET_USER_MEMORY_REGION:
    case KVM_SET_USER_MEMORY_REGION2: {
        const struct mem_region *r = arg;
        int64_t old = r ? flags_only_change(fd, r) : -1;
        uint64_t t0 = ns_of(CLOCK_MONOTONIC);
        ret = real_ioctl(fd, request, arg);
        uint64_t t1 = ns_of(CLOCK_MONOTONIC), end = ns_of(CLOCK_REALTIME);
        if (ret == 0 && r)
            remember_slot(fd, r);
        if (old >= 0)
            shim_log("memslot_flags slot=%#x flags=%#llx->%#x ret=%d dur_ns=%llu end_ns=%llu", r->slot,
                     (unsigned long long)old, r->flags, ret, (unsigned long long)(t1 - t0),
                     (unsigned long long)end);
        return ret;
    }
    case KVM_GET_DIRTY_LOG:
        __atomic_add_fetch(&n_get, 1, __ATOMIC_RELAXED);
        if (!drop_every)
            break;
        ret = real_ioctl(fd, request, arg);
        if (ret == 0 && arg)
            drop_dirty_bits(fd, arg);
        return ret;
    case KVM_CLEAR_DIRTY_LOG:
        if (__atomic_add_fetch(&n_clear, 1, __ATOMIC_RELAXED) == 1)
            shim_log("first clear_dirty_log fd=%d", fd);   /* at once: the exit line may come too late */
        break;
    }
    return real_ioctl(fd, request, arg);
}
