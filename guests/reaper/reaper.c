/*
 * migstall-reaper: start a program that daemonizes itself (qemu -daemonize)
 * and record how the daemon ends, so a QEMU that dies can say why.
 *
 *   migstall-reaper STATUSFILE -- PROG [ARGS...]
 *
 * QEMU -daemonize forks twice: the process we start waits until the daemon is
 * initialised and exits 0 (or 1), and the daemon is reparented.  Nobody can
 * waitpid() it, so its exit status and the signal that killed it are lost.
 * Here the original process forks a "reaper" that calls setsid() and
 * prctl(PR_SET_CHILD_SUBREAPER), so the daemon is reparented to it, not to init.
 *
 * The reaper forks and execs PROG (argv and environment untouched; signal
 * dispositions too: the reaper changes its own only after that fork), waits
 * for that direct child and sends its wait status to the original process
 * through a pipe.  The original process exits with that status (128+N if it
 * was killed by signal N), as if PROG had run in its place; 127 with a message
 * on stderr when PROG cannot be executed.  The reaper then points its
 * stdin/stdout/stderr at /dev/null (an SSH channel or a pipe of the caller
 * sees EOF once the daemon has done the same), reaps every process that is
 * reparented to it as soon as it exits (no zombies), and when none is left
 * writes one line into STATUSFILE, atomically (STATUSFILE.tmp + rename):
 *
 *   pid 1234: exited 1
 *   pid 1234: killed by signal 9 (SIGKILL)
 *   pid 1234: killed by signal 11 (SIGSEGV), core dumped
 *
 * With --lifeline PID (the harness's own pid, for a QEMU on the harness's
 * machine) the reaper also watches that process (a pidfd): when it ends
 * without having stopped its QEMU (SIGKILL, a crash), the reaper sends
 * SIGTERM to every process reparented to it, and SIGKILL to what is left
 * KILL_AFTER_MS later, so that nothing the harness started outlives it.  A
 * harness that means to leave its QEMU running (migstall vhost up) creates
 * STATUSFILE.detached first; the reaper then lets it be.
 *
 *   migstall-reaper [--lifeline PID] STATUSFILE -- PROG [ARGS...]
 *
 * Whose status: the first descendant other than the direct child that ended
 * abnormally (non-zero exit or a signal); if none did, the last one to end; if
 * there was none (PROG did not daemonize, or could not be executed), the
 * direct child.  For qemu -daemonize that is the daemon: its intermediate
 * process exits 0 right after forking it, and the waiting parent is the direct
 * child.  The pid lets the caller check it against QEMU's -pidfile.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PR_SET_CHILD_SUBREAPER
#define PR_SET_CHILD_SUBREAPER 36
#endif

#define ME "migstall-reaper"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

/* After the lifeline's SIGTERM, QEMU gets this long to exit on its own before
 * SIGKILL: a TCG guest or L1 of a few GiB here exits on SIGTERM in well under a
 * second (it unmaps its RAM); 5 s leaves room for a loaded host. */
#define KILL_AFTER_MS 5000

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
#define HAVE_SIGABBREV_NP 1
#endif

#ifndef HAVE_SIGABBREV_NP
/* sigabbrev_np() is glibc >= 2.32; older C libraries get this table */
static const char *const abbrev[] = {
    [SIGHUP] = "HUP", [SIGINT] = "INT", [SIGQUIT] = "QUIT", [SIGILL] = "ILL",
    [SIGTRAP] = "TRAP", [SIGABRT] = "ABRT", [SIGBUS] = "BUS", [SIGFPE] = "FPE",
    [SIGKILL] = "KILL", [SIGUSR1] = "USR1", [SIGSEGV] = "SEGV", [SIGUSR2] = "USR2",
    [SIGPIPE] = "PIPE", [SIGALRM] = "ALRM", [SIGTERM] = "TERM", [SIGCHLD] = "CHLD",
    [SIGCONT] = "CONT", [SIGSTOP] = "STOP", [SIGTSTP] = "TSTP", [SIGTTIN] = "TTIN",
    [SIGTTOU] = "TTOU", [SIGURG] = "URG", [SIGXCPU] = "XCPU", [SIGXFSZ] = "XFSZ",
    [SIGVTALRM] = "VTALRM", [SIGPROF] = "PROF", [SIGWINCH] = "WINCH", [SIGIO] = "IO",
    [SIGPWR] = "PWR", [SIGSYS] = "SYS",
};
#endif

static void signal_name(int sig, char *buf, size_t len)
{
    const char *name = NULL;
#ifdef HAVE_SIGABBREV_NP
    name = sigabbrev_np(sig);
#else
    if (sig > 0 && (size_t)sig < sizeof abbrev / sizeof abbrev[0])
        name = abbrev[sig];
#endif
    if (name)
        snprintf(buf, len, "SIG%s", name);
    else if (sig >= SIGRTMIN && sig <= SIGRTMAX)
        snprintf(buf, len, "SIGRTMIN+%d", sig - SIGRTMIN);
    else
        snprintf(buf, len, "%s", strsignal(sig));
}

static void describe(int status, char *buf, size_t len)
{
    char name[64];

    if (WIFEXITED(status)) {
        snprintf(buf, len, "exited %d", WEXITSTATUS(status));
    } else if (WIFSIGNALED(status)) {
        signal_name(WTERMSIG(status), name, sizeof name);
        snprintf(buf, len, "killed by signal %d (%s)%s", WTERMSIG(status), name,
                 WCOREDUMP(status) ? ", core dumped" : "");
    } else {
        snprintf(buf, len, "wait status 0x%x", (unsigned)status);
    }
}

static int abnormal(int status)
{
    return !WIFEXITED(status) || WEXITSTATUS(status) != 0;
}

static void write_status(const char *path, pid_t pid, int status)
{
    char desc[128], line[192], tmp[4096];
    int n, fd, ok;

    describe(status, desc, sizeof desc);
    n = snprintf(line, sizeof line, "pid %d: %s\n", (int)pid, desc);
    if (n < 0 || (size_t)n >= sizeof line)
        return;
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return;
    /* the caller may have removed its directory by now: then there is nobody to tell */
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    ok = write(fd, line, (size_t)n) == n;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) < 0)
        unlink(tmp);
}

static void quiet_stdio(void)
{
    int fd = open("/dev/null", O_RDWR | O_CLOEXEC);

    if (fd < 0)
        return;
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    if (fd > 2)
        close(fd);
}

/* Signal every process whose parent is this one (the reparented daemon). */
static void signal_children(int sig)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t me = getpid();

    if (!d)
        return;
    while ((e = readdir(d)) != NULL) {
        char path[300], buf[512], *rp;
        long ppid;
        ssize_t n;
        int fd;

        if (e->d_name[0] < '1' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = 0;
        rp = strrchr(buf, ')');        /* the command name may hold anything */
        if (rp && sscanf(rp + 1, " %*c %ld", &ppid) == 1 && (pid_t)ppid == me)
            kill((pid_t)atol(e->d_name), sig);
    }
    closedir(d);
}

static int detached(const char *statusfile)
{
    char path[4096];

    if ((size_t)snprintf(path, sizeof path, "%s.detached", statusfile) >= sizeof path)
        return 0;
    return access(path, F_OK) == 0;
}

/* The reaper: returns when every descendant has ended. */
static int reap(const char *statusfile, char **prog, int report, pid_t lifeline)
{
    pid_t child, pid, chosen = 0;
    int status, child_status = 0, chosen_status = 0, have_chosen = 0, chosen_abnormal = 0;
    int sfd = -1, pfd = -1, timeout = -1, owner_gone = 0, stopping = 0;
    struct timespec t_stop = { 0, 0 };
    sigset_t chld;

    if (setsid() < 0 || prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) {
        fprintf(stderr, ME ": setsid/PR_SET_CHILD_SUBREAPER: %s\n", strerror(errno));
        return 1;       /* the original process reads EOF and exits 1 */
    }
    child = fork();
    if (child < 0) {
        fprintf(stderr, ME ": fork: %s\n", strerror(errno));
        return 1;
    }
    if (child == 0) {
        execvp(prog[0], prog);
        fprintf(stderr, ME ": cannot run %s: %s\n", prog[0], strerror(errno));
        _exit(127);
    }
    /* only the reaper's own dispositions: PROG has its caller's */
    signal(SIGPIPE, SIG_IGN);   /* the original process may be gone when we report */
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    if (lifeline > 0) {
        /* SIGCHLD through a signalfd, so one poll() waits for a child or the owner */
        sigemptyset(&chld);
        sigaddset(&chld, SIGCHLD);
        sigprocmask(SIG_BLOCK, &chld, NULL);
        sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
        pfd = (int)syscall(SYS_pidfd_open, lifeline, 0);
        if (pfd < 0 && errno == ESRCH)
            owner_gone = 1;     /* it ended before we looked */
        if (sfd < 0 || (pfd < 0 && !owner_gone)) {
            /* no signalfd or pidfd (kernel < 5.3): just reap, as without --lifeline */
            if (sfd >= 0)
                close(sfd);
            sfd = -1;
            sigprocmask(SIG_UNBLOCK, &chld, NULL);
        }
    }

    for (;;) {
        if (owner_gone) {
            owner_gone = 0;
            if (pfd >= 0)
                close(pfd);
            pfd = -1;
            if (!detached(statusfile)) {
                stopping = 1;
                clock_gettime(CLOCK_MONOTONIC, &t_stop);
            }
        }
        if (stopping) {
            /* again at every wake-up: a daemon may be reparented to us later
             * (its launcher was still forking when the owner went) */
            struct timespec now;
            long ms;

            clock_gettime(CLOCK_MONOTONIC, &now);
            ms = (now.tv_sec - t_stop.tv_sec) * 1000 + (now.tv_nsec - t_stop.tv_nsec) / 1000000;
            signal_children(ms >= KILL_AFTER_MS ? SIGKILL : SIGTERM);
            timeout = ms >= KILL_AFTER_MS ? 1000 : (int)(KILL_AFTER_MS - ms);
        }
        pid = waitpid(-1, &status, sfd >= 0 ? WNOHANG : 0);
        if (pid == 0) {         /* children left, none ended: wait for news */
            struct pollfd p[2] = { { sfd, POLLIN, 0 }, { pfd, POLLIN, 0 } };
            int n = poll(p, pfd >= 0 ? 2 : 1, timeout);

            if (n > 0) {
                struct signalfd_siginfo si;

                while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si)
                    ;
                if (pfd >= 0 && p[1].revents)
                    owner_gone = 1;
            }
            continue;
        }
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            break;              /* ECHILD: nothing left to wait for */
        }
        if (pid == child) {
            child_status = status;
            quiet_stdio();
            if (report >= 0) {
                ssize_t n;
                do {
                    n = write(report, &status, sizeof status);
                } while (n < 0 && errno == EINTR);
                close(report);
                report = -1;
            }
        } else if (!chosen_abnormal) {
            chosen = pid;
            chosen_status = status;
            have_chosen = 1;
            chosen_abnormal = abnormal(status);
        }
    }
    if (!have_chosen) {
        chosen = child;
        chosen_status = child_status;
    }
    write_status(statusfile, chosen, chosen_status);
    return 0;
}

int main(int argc, char **argv)
{
    int fds[2], status;
    size_t got = 0;
    pid_t pid, lifeline = 0;

    if (argc > 2 && strcmp(argv[1], "--lifeline") == 0) {
        char *end;
        long v = strtol(argv[2], &end, 10);

        if (*argv[2] == 0 || *end != 0 || v <= 0) {
            fprintf(stderr, ME ": --lifeline wants a pid, not '%s'\n", argv[2]);
            return 2;
        }
        lifeline = (pid_t)v;
        argc -= 2;
        argv += 2;
    }
    if (argc < 4 || strcmp(argv[2], "--") != 0) {
        fprintf(stderr, "usage: " ME " [--lifeline PID] STATUSFILE -- PROG [ARGS...]\n");
        return 2;
    }
    if (pipe2(fds, O_CLOEXEC) < 0) {
        fprintf(stderr, ME ": pipe: %s\n", strerror(errno));
        return 1;
    }
    pid = fork();
    if (pid < 0) {
        fprintf(stderr, ME ": fork: %s\n", strerror(errno));
        return 1;
    }
    if (pid == 0) {
        close(fds[0]);
        return reap(argv[1], argv + 3, fds[1], lifeline);
    }
    close(fds[1]);
    while (got < sizeof status) {
        ssize_t n = read(fds[0], (char *)&status + got, sizeof status - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got != sizeof status) {
        fprintf(stderr, ME ": the reaper ended before %s returned\n", argv[3]);
        return 1;
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) {
        char desc[128];
        describe(status, desc, sizeof desc);
        fprintf(stderr, ME ": %s %s\n", argv[3], desc);
        return 128 + WTERMSIG(status);
    }
    return 1;
}
