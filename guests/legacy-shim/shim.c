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
#include <unistd.h>

#define KVM_CHECK_EXTENSION   0xAE03UL
#define KVM_ENABLE_CAP        0x4068AEA3UL
#define KVM_GET_DIRTY_LOG     0x4010AE42UL
#define KVM_CLEAR_DIRTY_LOG   0xC018AEC0UL
#define CAP_MANUAL_PROTECT2   168
#define CAP_DIRTY_LOG_RING    192
#define CAP_DIRTY_LOG_RING_ACQ_REL 223

struct enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; uint8_t pad[64]; };

typedef int (*ioctl_fn)(int, unsigned long, ...);
static ioctl_fn real_ioctl;
static int hide_manual;
static unsigned long n_get, n_clear;
static char log_path[4096];   /* $MIGSTALL_SHIM_LOG, read once (also used in the fork child) */

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
    shim_log("forked ppid=%d hide_manual=%d", (int)getppid(), hide_manual);
}

__attribute__((constructor)) static void shim_init(void)
{
    const char *h = getenv("MIGSTALL_SHIM_HIDE_MANUAL");
    const char *p = getenv("MIGSTALL_SHIM_LOG");
    real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    hide_manual = h && strcmp(h, "1") == 0;
    if (p && strlen(p) < sizeof(log_path))
        strcpy(log_path, p);
    pthread_atfork(NULL, NULL, shim_forked);
    shim_log("loaded hide_manual=%d", hide_manual);
}

__attribute__((destructor)) static void shim_fini(void)
{
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
    case KVM_GET_DIRTY_LOG:
        __atomic_add_fetch(&n_get, 1, __ATOMIC_RELAXED);
        break;
    case KVM_CLEAR_DIRTY_LOG:
        if (__atomic_add_fetch(&n_clear, 1, __ATOMIC_RELAXED) == 1)
            shim_log("first clear_dirty_log fd=%d", fd);   /* at once: the exit line may come too late */
        break;
    }
    return real_ioctl(fd, request, arg);
}
