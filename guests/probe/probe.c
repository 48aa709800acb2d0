/*
 * migstall guest probe.
 *
 * Runs inside the measured guest (started by /init).  It
 *   1. calibrates the TSC against CLOCK_MONOTONIC,
 *   2. opens the probe channel (virtio-serial port "migstall.0", else ttyS1),
 *   3. prefaults guest RAM with one pinned thread per vCPU and reports READY,
 *   4. runs one measure loop per vCPU (pio, write or cpu), recording every gap
 *      between consecutive iterations that is >= the threshold,
 *   5. answers "mark" and "dump" commands from the harness.
 *
 * With migstall.alias=N the guest's RAM under test is aliased (README
 * "Aliased guests"): N ivshmem BARs, all backed by the same host pages.  The
 * probe then touches and writes those BARs instead of its own memory, through
 * /sys/bus/pci/devices/.../resource2_wc mapped a window at a time, so that the
 * guest's page tables stay small; the guest kernel never uses them as RAM.
 *
 * The protocol is described in docs/probe-protocol.md.  Configuration comes
 * from the kernel command line (migstall.*).  Built static by the harness:
 *   gcc -static -O2 -pthread -o probe probe.c
 *
 * The measure loops make no system call and touch no device except the pio
 * loop's outb: under TCG an MMIO read (e.g. an hpet clocksource read) takes
 * QEMU's BQL, so the cpu loop timestamps with rdtsc only.  The control thread
 * blocks in read() on the channel and so does not perturb the loops.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PROTO 1
#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define MAX_CPUS 256
#define MAX_LOOPS 64
#define HIST_BUCKETS 32         /* bucket k: gaps in [2^k, 2^(k+1)) us; bucket 0 also holds < 1 us */
#define PROGRESS_STEP (64 * MIB)
#define VIRTIO_PORT_NAME "migstall.0"
#define SERIAL_DEV "/dev/ttyS1"
#define CHANNEL_WAIT_S 20
#define CONTROL_RT_PRIO 50      /* SCHED_FIFO priority of the control thread */
#define MAX_ALIAS 256           /* aliased-RAM devices (the harness places at most 232) */
#define ALIAS_WINDOW_MAX (8192 * MIB) /* largest window of aliased RAM one thread maps */
#define ALIAS_PT_BUDGET (64 * MIB)    /* guest page tables of all threads' windows: 8 B per 4 KiB */
#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110

enum cls { CLS_PIO, CLS_WRITE, CLS_CPU };
static const char *const cls_names[] = { "pio", "write", "cpu" };

struct stall { uint64_t t, d; };        /* start and length of a gap, in clock ticks */

struct worker {
	int cpu;
	int cls;
	int port_fd;                    /* pio via /dev/port when outb faults; -1 = outb */
	char *region;                   /* this worker's touched memory (aliased: the mapped window) */
	size_t bytes;
	uint64_t alias_start;           /* aliased: this worker's share of the aliased range */
	uint64_t win_off;               /* aliased: offset in the share where the window starts */
	size_t win_len;                 /* aliased: length of the mapped window (0: none) */
	uint64_t remaps;                /* aliased write loop: window changes in the loop */
	uint64_t remap_ticks;           /* their time, not counted as gaps */
	struct stall *stalls;           /* preallocated and pre-touched */
	size_t nstalls;
	uint64_t dropped;
	uint64_t iters;
	uint64_t hist[HIST_BUCKETS];
	uint64_t sink;
	pthread_t th;
} __attribute__((aligned(64)));

struct alias_bar {
	char path[300];                 /* resource2_wc (or resource2) in sysfs */
	uint64_t start, size;           /* guest-physical */
	int fd;
};

static struct {
	/* configuration */
	long touch_mib;                 /* 0 = as much as can be spared */
	int loops[MAX_LOOPS];
	int nloops;
	long threshold_us;
	long max_stalls;                /* per vCPU */
	long write_mib;                 /* write loop cycles over this much of its region; 0 = all */
	char channel[16];               /* "virtio" | "serial" | "" (auto) */
	char clock_req[8];              /* "tsc" | "mono" | "" (auto) */
	long alias_devices;             /* aliased RAM: ivshmem BARs expected; 0 = not aliased */

	/* clock */
	int use_tsc;
	uint64_t tsc_hz;
	uint64_t tsc0, mono0;           /* calibration origin */
	uint64_t thr_ticks;
	uint64_t us_mult;               /* ticks * us_mult >> 32 = microseconds */

	/* state */
	int fd;                         /* channel */
	pthread_mutex_t out_lock;
	int ncpus;
	struct worker *workers;
	pthread_barrier_t touched;
	pthread_barrier_t measuring;    /* workers and control thread: loops about to start */
	atomic_int stop;
	atomic_ulong done_bytes;
	uint64_t total_bytes;
	int loops_stopped;

	/* aliased RAM: the BARs, in guest-physical order */
	int nalias;
	struct alias_bar alias[MAX_ALIAS];
	uint64_t alias_total;
	uint64_t alias_window;          /* bytes one thread maps at a time */
} g = {
	.threshold_us = 50,
	.max_stalls = 131072,
	.fd = -1,
	.out_lock = PTHREAD_MUTEX_INITIALIZER,
};

/* ---------------------------------------------------------------- clocks */

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The measure clock: raw TSC ticks, or CLOCK_MONOTONIC ns. */
static inline uint64_t now(void)
{
	return g.use_tsc ? rdtsc() : mono_ns();
}

static uint64_t ticks_to_ns(uint64_t ticks)
{
	if (!g.use_tsc)
		return ticks;
	return (uint64_t)((unsigned __int128)ticks * 1000000000ULL / g.tsc_hz);
}

/* A point on the measure clock as guest ns (CLOCK_MONOTONIC timeline). */
static uint64_t clock_to_ns(uint64_t t)
{
	if (!g.use_tsc)
		return t;
	if (t >= g.tsc0)
		return g.mono0 + ticks_to_ns(t - g.tsc0);
	return g.mono0 - ticks_to_ns(g.tsc0 - t);
}

/* One (tsc, mono) pair, bracketed as tightly as possible. */
static void clock_pair(uint64_t *tsc, uint64_t *ns)
{
	uint64_t best = UINT64_MAX;
	for (int i = 0; i < 9; i++) {
		uint64_t a = mono_ns(), t = rdtsc(), b = mono_ns();
		if (b - a < best) {
			best = b - a;
			*tsc = t;
			*ns = a + (b - a) / 2;
		}
	}
}

static void calibrate(void)
{
	uint64_t t0, n0, t1, n1;
	struct timespec d = { 0, 250 * 1000 * 1000 };

	g.use_tsc = 0;
	if (strcmp(g.clock_req, "mono") != 0) {
		clock_pair(&t0, &n0);
		nanosleep(&d, NULL);
		clock_pair(&t1, &n1);
		if (t1 > t0 && n1 > n0) {
			uint64_t hz = (uint64_t)((unsigned __int128)(t1 - t0) * 1000000000ULL / (n1 - n0));
			if (hz >= 100000000ULL && hz <= 20000000000ULL) {
				g.use_tsc = 1;
				g.tsc_hz = hz;
				g.tsc0 = t0;
				g.mono0 = n0;
			}
		}
		if (!g.use_tsc)
			fprintf(stderr, "probe: TSC calibration failed, using CLOCK_MONOTONIC\n");
	}
	uint64_t hz = g.use_tsc ? g.tsc_hz : 1000000000ULL;
	g.thr_ticks = (uint64_t)g.threshold_us * hz / 1000000ULL;
	g.us_mult = (uint64_t)(((unsigned __int128)1000000ULL << 32) / hz);
}

/* ------------------------------------------------------------- output */

struct sb { char *p; size_t n, cap; };

static void sb_printf(struct sb *b, const char *fmt, ...)
{
	for (;;) {
		va_list ap;
		size_t room = b->cap - b->n;
		va_start(ap, fmt);
		int k = vsnprintf(b->p ? b->p + b->n : NULL, room, fmt, ap);
		va_end(ap);
		if (k < 0)
			return;
		if ((size_t)k < room) {
			b->n += (size_t)k;
			return;
		}
		size_t cap = b->cap ? b->cap * 2 : 4096;
		while (cap - b->n <= (size_t)k)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (!p)
			abort();
		b->p = p;
		b->cap = cap;
	}
}

static void sb_json_str(struct sb *b, const char *s)
{
	sb_printf(b, "\"");
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			sb_printf(b, "\\%c", c);
		else if (c < 0x20)
			sb_printf(b, "\\u%04x", c);
		else
			sb_printf(b, "%c", c);
	}
	sb_printf(b, "\"");
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* Send one JSON line (the buffer without its newline); frees the buffer. */
static void send_line(struct sb *b)
{
	sb_printf(b, "\n");
	pthread_mutex_lock(&g.out_lock);
	if (g.fd >= 0 && write_all(g.fd, b->p, b->n) < 0)
		fprintf(stderr, "probe: channel write failed: %s\n", strerror(errno));
	pthread_mutex_unlock(&g.out_lock);
	free(b->p);
	b->p = NULL;
	b->n = b->cap = 0;
}

static void __attribute__((noreturn, format(printf, 1, 2))) fatal(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "probe: error: %s\n", msg);
	if (g.fd >= 0) {
		struct sb b = { 0 };
		sb_printf(&b, "{\"ev\":\"error\",\"msg\":");
		sb_json_str(&b, msg);
		sb_printf(&b, "}");
		send_line(&b);
	}
	exit(1);
}

/* ----------------------------------------------------------- config */

/* A configuration error, reported once the channel is open. */
static char cfg_err[256];

static void __attribute__((format(printf, 1, 2))) config_error(const char *fmt, ...)
{
	va_list ap;
	if (cfg_err[0])
		return;
	va_start(ap, fmt);
	vsnprintf(cfg_err, sizeof cfg_err, fmt, ap);
	va_end(ap);
}

static void parse_loops(const char *v)
{
	char buf[512];
	snprintf(buf, sizeof buf, "%s", v);
	g.nloops = 0;
	for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		int c = -1;
		for (int i = 0; i < 3; i++)
			if (strcmp(tok, cls_names[i]) == 0)
				c = i;
		if (c < 0) {
			config_error("migstall.loops: unknown loop '%s' (use pio, write or cpu)", tok);
			continue;
		}
		if (g.nloops < MAX_LOOPS)
			g.loops[g.nloops++] = c;
	}
}

static long parse_num(const char *key, const char *v, long min)
{
	char *end;
	errno = 0;
	long n = strtol(v, &end, 10);
	if (errno || *v == '\0' || *end != '\0' || n < min) {
		config_error("%s=%s: expected an integer >= %ld", key, v, min);
		return min;
	}
	return n;
}

static void read_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
	if (fd >= 0)
		close(fd);
	g.loops[0] = CLS_PIO;
	g.loops[1] = CLS_WRITE;
	g.nloops = 2;
	if (n <= 0)
		return;
	buf[n] = '\0';
	for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(tok, "migstall.", 9) != 0)
			continue;
		char *eq = strchr(tok, '=');
		if (!eq)
			continue;
		*eq = '\0';
		const char *k = tok, *v = eq + 1;
		if (!strcmp(k, "migstall.touch_mib"))
			g.touch_mib = parse_num(k, v, 0);
		else if (!strcmp(k, "migstall.loops"))
			parse_loops(v);
		else if (!strcmp(k, "migstall.threshold_us"))
			g.threshold_us = parse_num(k, v, 1);
		else if (!strcmp(k, "migstall.write_mib"))
			g.write_mib = parse_num(k, v, 0);
		else if (!strcmp(k, "migstall.max_stalls"))
			g.max_stalls = parse_num(k, v, 1);
		else if (!strcmp(k, "migstall.channel"))
			snprintf(g.channel, sizeof g.channel, "%s", v);
		else if (!strcmp(k, "migstall.alias"))
			g.alias_devices = parse_num(k, v, 0);
		else if (!strcmp(k, "migstall.clock"))
			snprintf(g.clock_req, sizeof g.clock_req, "%s", v);
		else
			fprintf(stderr, "probe: ignoring unknown parameter %s\n", k);
	}
}

static long meminfo_kib(const char *field)
{
	char line[256];
	long val = -1;
	size_t fl = strlen(field);
	FILE *f = fopen("/proc/meminfo", "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, field, fl) && line[fl] == ':') {
			val = strtol(line + fl + 1, NULL, 10);
			break;
		}
	fclose(f);
	return val;
}

/*
 * The guest-physical address of the kernel's pvclock wall-clock structure
 * (kvmclock's `wall_clock`, struct pvclock_wall_clock: version, sec, nsec;
 * 12 bytes), or -1.  KVM writes it whenever MSR_KVM_WALL_CLOCK_NEW is written,
 * and QEMU writes that MSR when it restores a migrated vCPU: the destination's
 * KVM rewrites this structure in guest RAM after the migration, even while the
 * destination is paused, so the harness's memory check must not count it as a
 * lost write.  Found as the physical start of "Kernel code" (/proc/iomem) plus
 * wall_clock - _text (/proc/kallsyms; both need root and KALLSYMS_ALL).
 */
static long long wall_clock_gpa(void)
{
	char line[512];
	unsigned long long text = 0, wc = 0, code = 0, lo, hi;
	FILE *f = fopen("/proc/kallsyms", "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f) && !(text && wc)) {
		char type, name[256];
		unsigned long long a;
		if (sscanf(line, "%llx %c %255s", &a, &type, name) != 3 || strchr(line, '['))
			continue;
		if (!strcmp(name, "_text"))
			text = a;
		else if (!strcmp(name, "wall_clock") && (type == 'b' || type == 'd'))
			wc = a;
	}
	fclose(f);
	if (!(f = fopen("/proc/iomem", "r")))
		return -1;
	while (fgets(line, sizeof line, f))
		if (strstr(line, ": Kernel code") && sscanf(line, " %llx-%llx", &lo, &hi) == 2) {
			code = lo;
			break;
		}
	fclose(f);
	if (!text || !wc || !code || wc < text)
		return -1;
	return (long long)(code + (wc - text));
}

/* ----------------------------------------------------------- channel */

/* /dev/vportNpM of the virtio-serial port named migstall.0, or "" */
static int find_virtio_port(char *dev, size_t len)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	int found = 0;
	if (!d)
		return 0;
	while (!found && (e = readdir(d))) {
		char path[512], name[64] = "";
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		int fd = open(path, O_RDONLY);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, name, sizeof name - 1);
		close(fd);
		if (n <= 0)
			continue;
		name[n] = '\0';
		name[strcspn(name, "\n")] = '\0';
		if (!strcmp(name, VIRTIO_PORT_NAME)) {
			snprintf(dev, len, "/dev/%s", e->d_name);
			found = 1;
		}
	}
	closedir(d);
	return found;
}

static void open_channel(void)
{
	char dev[300];
	int want_virtio = strcmp(g.channel, "serial") != 0;
	int need_virtio = !strcmp(g.channel, "virtio");

	if (want_virtio) {
		/* the port appears asynchronously after virtio_console probes */
		struct timespec d = { 0, 20 * 1000 * 1000 };
		int waits = need_virtio ? CHANNEL_WAIT_S * 50 : 25;
		for (int i = 0; i < waits; i++) {
			if (find_virtio_port(dev, sizeof dev)) {
				for (int j = 0; j < 250; j++) {  /* devtmpfs node */
					g.fd = open(dev, O_RDWR | O_CLOEXEC);
					if (g.fd >= 0 || errno != ENOENT)
						break;
					nanosleep(&d, NULL);
				}
				if (g.fd < 0)
					fatal("cannot open %s: %s", dev, strerror(errno));
				snprintf(g.channel, sizeof g.channel, "virtio");
				fprintf(stderr, "probe: channel %s (%s)\n", dev, VIRTIO_PORT_NAME);
				return;
			}
			nanosleep(&d, NULL);
		}
		if (need_virtio)
			fatal("no virtio-serial port named %s after %d s", VIRTIO_PORT_NAME, CHANNEL_WAIT_S);
	}
	g.fd = open(SERIAL_DEV, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (g.fd < 0)
		fatal("cannot open %s: %s", SERIAL_DEV, strerror(errno));
	struct termios t;
	if (tcgetattr(g.fd, &t) == 0) {
		cfmakeraw(&t);
		cfsetispeed(&t, B115200);
		cfsetospeed(&t, B115200);
		t.c_cflag |= CLOCAL | CREAD;
		t.c_cc[VMIN] = 1;
		t.c_cc[VTIME] = 0;
		tcsetattr(g.fd, TCSANOW, &t);
	}
	snprintf(g.channel, sizeof g.channel, "serial");
	fprintf(stderr, "probe: channel %s\n", SERIAL_DEV);
}

/* ------------------------------------------------------- aliased RAM */

static void read_small(const char *path, char *buf, size_t len);

static int read_hex_file(const char *path, unsigned long long *out)
{
	char buf[64];
	read_small(path, buf, sizeof buf);
	return buf[0] && sscanf(buf, "%llx", out) == 1;
}

static int cmp_alias(const void *a, const void *b)
{
	uint64_t x = ((const struct alias_bar *)a)->start, y = ((const struct alias_bar *)b)->start;
	return x < y ? -1 : x > y;
}

/* The ivshmem BARs (BAR 2) the harness gave the guest, sorted by address. */
static void find_alias(void)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	if (!d)
		fatal("aliased RAM: cannot list /sys/bus/pci/devices: %s", strerror(errno));
	while ((e = readdir(d))) {
		char path[512], line[256];
		unsigned long long ven, dev, s0, e0, f0;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vendor", e->d_name);
		if (!read_hex_file(path, &ven) || ven != IVSHMEM_VENDOR)
			continue;
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", e->d_name);
		if (!read_hex_file(path, &dev) || dev != IVSHMEM_DEVICE)
			continue;
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource", e->d_name);
		FILE *f = fopen(path, "r");
		int ok = 0;
		for (int i = 0; f && i < 3 && fgets(line, sizeof line, f); i++)
			ok = i == 2 && sscanf(line, "%llx %llx %llx", &s0, &e0, &f0) == 3 && e0 > s0;
		if (f)
			fclose(f);
		if (!ok)
			fatal("aliased RAM: device %s has no BAR 2 assigned (the firmware or the guest kernel could not "
			      "place it; see the guest console)", e->d_name);
		if (g.nalias == MAX_ALIAS)
			fatal("aliased RAM: more than %d ivshmem devices", MAX_ALIAS);
		int k = g.nalias++;
		/* write-combining where the BAR is prefetchable (it is): no uncached stores under NPT */
		snprintf(g.alias[k].path, sizeof g.alias[k].path, "/sys/bus/pci/devices/%s/resource2_wc", e->d_name);
		if (access(g.alias[k].path, F_OK) != 0)
			snprintf(g.alias[k].path, sizeof g.alias[k].path, "/sys/bus/pci/devices/%s/resource2", e->d_name);
		g.alias[k].start = s0;
		g.alias[k].size = e0 - s0 + 1;
	}
	closedir(d);
	if (g.nalias != g.alias_devices)
		fatal("aliased RAM: found %d ivshmem BARs, the harness gave the guest %ld", g.nalias, g.alias_devices);
	qsort(g.alias, (size_t)g.nalias, sizeof g.alias[0], cmp_alias);
	for (int k = 0; k < g.nalias; k++) {
		g.alias[k].fd = open(g.alias[k].path, O_RDWR | O_CLOEXEC);
		if (g.alias[k].fd < 0)
			fatal("aliased RAM: cannot open %s: %s", g.alias[k].path, strerror(errno));
		g.alias_total += g.alias[k].size;
	}
}

/* The window size: the guest page tables of every thread's window within
 * ALIAS_PT_BUDGET (a 4 KiB page costs an 8-byte PTE), at most ALIAS_WINDOW_MAX.
 * Large windows keep window changes rare: each is a munmap, whose TLB
 * shootdown interrupts the other vCPUs' loops (same mm). */
static void alias_window_size(void)
{
	uint64_t w = ALIAS_PT_BUDGET / (uint64_t)g.ncpus / 8 * PAGE;
	if (w > ALIAS_WINDOW_MAX)
		w = ALIAS_WINDOW_MAX;
	w &= ~(2 * MIB - 1);
	g.alias_window = w ? w : 2 * MIB;
}

/* Map the window of w's share that starts at share offset `off`: at most
 * g.alias_window, never past the share, contiguous in the probe's address
 * space even where it spans several BARs (one MAP_FIXED mapping of each BAR
 * piece into a reserved range).  Unmaps the old window first. */
static void alias_map(struct worker *w, uint64_t off)
{
	if (w->win_len)
		munmap(w->region, w->win_len);
	w->win_len = 0;
	uint64_t len = w->bytes - off < g.alias_window ? w->bytes - off : g.alias_window;
	char *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (base == MAP_FAILED)
		fatal("aliased RAM: cannot reserve %llu bytes of address space: %s", (unsigned long long)len,
		      strerror(errno));
	uint64_t pos = w->alias_start + off, done = 0;
	int k = 0;
	while (k < g.nalias - 1 && pos >= g.alias[k].size) {
		pos -= g.alias[k].size;
		k++;
	}
	while (done < len) {
		uint64_t piece = g.alias[k].size - pos < len - done ? g.alias[k].size - pos : len - done;
		void *p = mmap(base + done, piece, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, g.alias[k].fd,
			       (off_t)pos);
		if (p == MAP_FAILED)
			fatal("aliased RAM: cannot map %llu bytes of %s at %llu: %s", (unsigned long long)piece,
			      g.alias[k].path, (unsigned long long)pos, strerror(errno));
		done += piece;
		pos = 0;
		k++;
	}
	w->region = base;
	w->win_off = off;
	w->win_len = (size_t)len;
}

/* ------------------------------------------------------- measure loops */

static inline void account(struct worker *w, uint64_t prev, uint64_t t)
{
	uint64_t gap = t - prev;
	if ((int64_t)gap < 0)
		gap = 0;
	w->iters++;
	uint64_t us = (uint64_t)(((unsigned __int128)gap * g.us_mult) >> 32);
	int b = us ? 63 - __builtin_clzll(us) : 0;
	w->hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1]++;
	if (__builtin_expect(gap >= g.thr_ticks, 0)) {
		if (w->nstalls < (size_t)g.max_stalls) {
			w->stalls[w->nstalls].t = prev;
			w->stalls[w->nstalls].d = gap;
			w->nstalls++;
		} else {
			w->dropped++;
		}
	}
}

/* Called by each loop just before its first timestamp: READY is sent once
 * every loop is past this point. */
static void started(void)
{
	pthread_barrier_wait(&g.measuring);
}

static inline int stopped(void)
{
	return atomic_load_explicit(&g.stop, memory_order_relaxed);
}

static void loop_pio(struct worker *w)
{
	started();
	uint64_t prev = now();
	static const unsigned char zero;
	while (!stopped()) {
		if (w->port_fd < 0)
			outb(0, 0x80);
		else if (pwrite(w->port_fd, &zero, 1, 0x80) != 1)
			break;
		uint64_t t = now();
		account(w, prev, t);
		prev = t;
	}
}

static void loop_write(struct worker *w)
{
	volatile char *r = w->region;
	size_t pages = w->bytes / PAGE, p = 0;
	if (g.write_mib && (size_t)g.write_mib * MIB / PAGE < pages)
		pages = (size_t)g.write_mib * MIB / PAGE;
	started();
	uint64_t prev = now();
	while (!stopped()) {
		/* a value never written before (the iteration count), so every
		 * write changes its page: a page that was sent, then written, and
		 * never sent again differs between source and destination */
		*(volatile uint64_t *)(r + p * PAGE + (w->iters & 63) * 8) = w->iters;
		if (++p == pages)
			p = 0;
		uint64_t t = now();
		account(w, prev, t);
		prev = t;
	}
}

/* The write loop over aliased RAM: the same stores, across the whole share,
 * a window at a time.  Changing the window is a system call (munmap + mmap
 * of up to g.alias_window): its time is left out of the gaps and counted in
 * remaps/remap_ns instead, so it neither hides in nor inflates the stalls. */
static void loop_write_alias(struct worker *w)
{
	uint64_t span = w->bytes, off = 0;
	if (g.write_mib && (uint64_t)g.write_mib * MIB < span)
		span = (uint64_t)g.write_mib * MIB;
	alias_map(w, 0);
	started();
	uint64_t prev = now();
	while (!stopped()) {
		*(volatile uint64_t *)(w->region + (off - w->win_off) + (w->iters & 63) * 8) = w->iters;
		off += PAGE;
		uint64_t t = now();
		account(w, prev, t);
		prev = t;
		if (off >= span)
			off = 0;
		/* past the window: map the next one (a share that fits one window never does) */
		if (off < w->win_off || off - w->win_off >= w->win_len) {
			alias_map(w, off);
			uint64_t t2 = now();
			w->remaps++;
			w->remap_ticks += t2 - t;
			prev = t2;
		}
	}
}

static void loop_cpu(struct worker *w)
{
	uint64_t x = 0x9e3779b97f4a7c15ULL ^ (uint64_t)w->cpu;
	started();
	uint64_t prev = now();
	while (!stopped()) {
		for (int i = 0; i < 16; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
		}
		__asm__ __volatile__("" : "+r"(x));
		uint64_t t = now();
		account(w, prev, t);
		prev = t;
	}
	w->sink = x;
}

static void report_progress(uint64_t before, uint64_t after)
{
	if (before / PROGRESS_STEP == after / PROGRESS_STEP || after >= g.total_bytes)
		return;
	struct sb b = { 0 };
	sb_printf(&b, "{\"ev\":\"prefault\",\"done_mib\":%lu,\"total_mib\":%lu}",
		  (unsigned long)(after / MIB), (unsigned long)(g.total_bytes / MIB));
	send_line(&b);
}

/* The pio loop's outb needs the I/O bitmap that ioperm() sets up.  Where the
 * CPU (or its emulation) does not honour it -- seen with L2 guests under
 * TCG's nested SVM, where outb raises #GP -- fall back to writing /dev/port:
 * the kernel then does the outb, which still exits to QEMU under the BQL. */
static __thread sigjmp_buf pio_jmp;

static void pio_fault(int sig)
{
	(void)sig;
	siglongjmp(pio_jmp, 1);
}

static void pio_setup(struct worker *w)
{
	static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	struct sigaction sa = { .sa_handler = pio_fault }, old;
	volatile int faulted = 0;

	w->port_fd = -1;
	if (ioperm(0x80, 1, 1) == 0) {
		pthread_mutex_lock(&lock);      /* the handler is process-wide */
		sigemptyset(&sa.sa_mask);
		sigaction(SIGSEGV, &sa, &old);
		if (sigsetjmp(pio_jmp, 1) == 0)
			outb(0, 0x80);
		else
			faulted = 1;
		sigaction(SIGSEGV, &old, NULL);
		pthread_mutex_unlock(&lock);
		if (!faulted)
			return;
	}
	w->port_fd = open("/dev/port", O_WRONLY | O_CLOEXEC);
	if (w->port_fd < 0)
		fatal("pio loop: outb to port 0x80 faults and /dev/port cannot be opened: %s", strerror(errno));
	fprintf(stderr, "probe: cpu %d: outb faults here; the pio loop writes /dev/port instead\n", w->cpu);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(w->cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set) != 0)
		fatal("cannot pin a thread to CPU %d: %s", w->cpu, strerror(errno));
	if (w->cls == CLS_PIO)
		pio_setup(w);

	/* prefault */
	const size_t chunk = 4 * MIB;
	if (g.nalias) {
		/* aliased: window by window; each touch maps a 4 KiB page in KVM */
		for (uint64_t off = 0; off < w->bytes; off += w->win_len) {
			alias_map(w, off);
			for (size_t o = 0; o < w->win_len; o += PAGE)
				((volatile char *)w->region)[o] = 1;
			uint64_t before = atomic_fetch_add(&g.done_bytes, (uint64_t)w->win_len);
			report_progress(before, before + w->win_len);
		}
		if (w->win_len)
			munmap(w->region, w->win_len);
		w->win_len = 0;
	}
	for (size_t off = 0; !g.nalias && off < w->bytes; off += chunk) {
		size_t end = off + chunk < w->bytes ? off + chunk : w->bytes;
		for (size_t o = off; o < end; o += PAGE)
			((volatile char *)w->region)[o] = 1;
		uint64_t n = end - off;
		uint64_t before = atomic_fetch_add(&g.done_bytes, n);
		report_progress(before, before + n);
	}
	pthread_barrier_wait(&g.touched);

	/* measure, from now until "dump" */
	switch (w->cls) {
	case CLS_PIO:
		loop_pio(w);
		break;
	case CLS_WRITE:
		if (g.nalias)
			loop_write_alias(w);
		else
			loop_write(w);
		break;
	default:
		loop_cpu(w);
		break;
	}
	return NULL;
}

/* ---------------------------------------------------------- commands */

static void read_small(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, buf, len - 1) : -1;
	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
}

static void send_hello(void)
{
	struct utsname u;
	struct sb b = { 0 };
	char cs[64];
	uname(&u);
	read_small("/sys/devices/system/clocksource/clocksource0/current_clocksource", cs, sizeof cs);
	sb_printf(&b, "{\"ev\":\"hello\",\"proto\":%d,\"vcpus\":%d,\"clock\":\"%s\",\"tsc_hz\":%lu,"
		  "\"kernel\":", PROTO, g.ncpus, g.use_tsc ? "tsc" : "mono", (unsigned long)g.tsc_hz);
	sb_json_str(&b, u.release);
	sb_printf(&b, ",\"clocksource\":");
	sb_json_str(&b, cs);
	sb_printf(&b, ",\"mem_total_mib\":%ld,\"channel\":\"%s\",\"threshold_us\":%ld,\"max_stalls\":%ld,"
		  "\"write_mib\":%ld,\"wall_clock_gpa\":%lld}", meminfo_kib("MemTotal") / 1024, g.channel,
		  g.threshold_us, g.max_stalls, g.write_mib, wall_clock_gpa());
	send_line(&b);
}

static void stop_loops(void)
{
	if (g.loops_stopped)
		return;
	atomic_store(&g.stop, 1);
	for (int i = 0; i < g.ncpus; i++)
		pthread_join(g.workers[i].th, NULL);
	g.loops_stopped = 1;
}

static void send_dump(void)
{
	stop_loops();
	for (int i = 0; i < g.ncpus; i++) {
		struct worker *w = &g.workers[i];
		struct sb b = { 0 };
		sb_printf(&b, "{\"ev\":\"stalls\",\"cpu\":%d,\"cls\":\"%s\",\"threshold_us\":%ld,\"iters\":%lu,"
			  "\"stalls\":[", w->cpu, cls_names[w->cls], g.threshold_us, (unsigned long)w->iters);
		for (size_t k = 0; k < w->nstalls; k++)
			sb_printf(&b, "%s[%lu,%lu]", k ? "," : "",
				  (unsigned long)clock_to_ns(w->stalls[k].t),
				  (unsigned long)ticks_to_ns(w->stalls[k].d));
		sb_printf(&b, "],\"hist_log2us\":[");
		int last = HIST_BUCKETS - 1;
		while (last > 0 && !w->hist[last])
			last--;
		for (int k = 0; k <= last; k++)
			sb_printf(&b, "%s%lu", k ? "," : "", (unsigned long)w->hist[k]);
		sb_printf(&b, "],\"dropped\":%lu,\"remaps\":%lu,\"remap_ns\":%lu}", (unsigned long)w->dropped,
			  (unsigned long)w->remaps, (unsigned long)ticks_to_ns(w->remap_ticks));
		send_line(&b);
	}
	struct sb b = { 0 };
	sb_printf(&b, "{\"ev\":\"end\"}");
	send_line(&b);
}

/* Returns 0 to keep going, 1 to quit. */
static int handle(char *line, uint64_t t_recv)
{
	unsigned long long id, host_ns;
	if (sscanf(line, "mark %llu %llu", &id, &host_ns) == 2) {
		struct sb b = { 0 };
		sb_printf(&b, "{\"ev\":\"mark\",\"id\":%llu,\"host_ns\":%llu,\"guest_ns\":%lu}",
			  id, host_ns, (unsigned long)clock_to_ns(t_recv));
		send_line(&b);
	} else if (!strcmp(line, "dump")) {
		send_dump();
	} else if (!strcmp(line, "quit")) {
		return 1;
	} else if (line[0]) {
		fprintf(stderr, "probe: ignoring unknown command '%.64s'\n", line);
	}
	return 0;
}

static void command_loop(void)
{
	char buf[4096];
	size_t n = 0;
	struct timespec d = { 0, 100 * 1000 * 1000 };
	for (;;) {
		ssize_t k = read(g.fd, buf + n, sizeof buf - 1 - n);
		uint64_t t = now();
		if (k < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fatal("channel read failed: %s", strerror(errno));
		}
		if (k == 0) {
			/* virtio-serial: the host side is not connected; wait for it */
			nanosleep(&d, NULL);
			continue;
		}
		n += (size_t)k;
		char *start = buf, *nl;
		while ((nl = memchr(start, '\n', n - (size_t)(start - buf)))) {
			*nl = '\0';
			char *line = start;
			size_t len = strlen(line);
			while (len && (line[len - 1] == '\r' || isspace((unsigned char)line[len - 1])))
				line[--len] = '\0';
			if (handle(line, t))
				return;
			start = nl + 1;
		}
		n -= (size_t)(start - buf);
		memmove(buf, start, n);
		if (n == sizeof buf - 1)
			n = 0;  /* an overlong line: drop it */
	}
}

/* -------------------------------------------------------------- main */

int main(void)
{
	setvbuf(stderr, NULL, _IOLBF, 0);
	read_cmdline();
	g.ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
	if (g.ncpus < 1)
		g.ncpus = 1;
	if (g.ncpus > MAX_CPUS)
		g.ncpus = MAX_CPUS;
	calibrate();
	open_channel();
	if (cfg_err[0])
		fatal("%s", cfg_err);
	if (g.nloops < 1)
		fatal("migstall.loops: no loop given (use pio, write or cpu)");
	send_hello();

	/* stall buffers first, touched, so the loops never fault on them */
	g.workers = aligned_alloc(64, sizeof(struct worker) * (size_t)g.ncpus);
	if (!g.workers)
		fatal("out of memory");
	memset(g.workers, 0, sizeof(struct worker) * (size_t)g.ncpus);
	for (int i = 0; i < g.ncpus; i++) {
		struct worker *w = &g.workers[i];
		w->cpu = i;
		w->cls = g.loops[i < g.nloops ? i : g.nloops - 1];
		size_t sz = sizeof(struct stall) * (size_t)g.max_stalls;
		w->stalls = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (w->stalls == MAP_FAILED)
			fatal("cannot allocate %zu bytes for stall records", sz);
		memset(w->stalls, 0, sz);
	}

	/* how much to touch */
	if (g.alias_devices) {
		find_alias();
		alias_window_size();
	}
	long avail_mib = meminfo_kib("MemAvailable") / 1024;
	long total_mib = meminfo_kib("MemTotal") / 1024;
	long reserve = total_mib / 8 > 64 ? total_mib / 8 : 64;
	long spare = avail_mib - reserve;
	long per = 0;
	if (g.nalias)   /* aliased: the BARs, not the guest's own memory */
		spare = (long)(g.alias_total / MIB);
	if (spare < g.ncpus)
		fatal("the guest has no memory to spare (MemAvailable %ld MiB, reserve %ld MiB)", avail_mib, reserve);
	long want = g.touch_mib ? g.touch_mib : spare;
	if (want > spare) {
		fprintf(stderr, "probe: touch_mib=%ld exceeds the %ld MiB the guest can spare; touching %ld\n",
			want, spare, spare);
		want = spare;
	}
	per = want / g.ncpus;
	if (per < 1)
		per = 1;
	g.total_bytes = (uint64_t)per * (uint64_t)g.ncpus * MIB;
	for (int i = 0; i < g.ncpus && g.nalias; i++) {
		g.workers[i].bytes = (size_t)per * MIB;
		g.workers[i].alias_start = (uint64_t)i * (uint64_t)per * MIB;
	}
	for (int i = 0; i < g.ncpus && !g.nalias; i++) {
		struct worker *w = &g.workers[i];
		w->bytes = (size_t)per * MIB;
		w->region = mmap(NULL, w->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (w->region == MAP_FAILED)
			fatal("cannot map %ld MiB", per);
	}

	/* prefault, then the loops start */
	if (pthread_barrier_init(&g.touched, NULL, (unsigned)g.ncpus + 1) != 0 ||
	    pthread_barrier_init(&g.measuring, NULL, (unsigned)g.ncpus + 1) != 0)
		fatal("pthread_barrier_init failed");
	uint64_t t0 = mono_ns();
	for (int i = 0; i < g.ncpus; i++)
		if (pthread_create(&g.workers[i].th, NULL, worker_main, &g.workers[i]) != 0)
			fatal("pthread_create failed");
	/* the control thread lives on vCPU0 with the housekeeping (the kernel
	 * command line makes the other vCPUs tickless: nohz_full) */
	cpu_set_t set0;
	CPU_ZERO(&set0);
	CPU_SET(0, &set0);
	if (sched_setaffinity(0, sizeof set0, &set0) != 0)
		fprintf(stderr, "probe: cannot pin the control thread to CPU 0: %s\n", strerror(errno));
	/* and it runs at real-time priority: a mark is answered as soon as its
	 * interrupt arrives, even while the loop on vCPU0 spins or takes a storm
	 * of write faults (CFS would make it wait for its share of the CPU) */
	struct sched_param rt = { .sched_priority = CONTROL_RT_PRIO };
	if (sched_setscheduler(0, SCHED_FIFO, &rt) != 0)
		fprintf(stderr, "probe: cannot make the control thread SCHED_FIFO: %s\n", strerror(errno));
	pthread_barrier_wait(&g.touched);
	double ms = (double)(mono_ns() - t0) / 1e6;
	/* READY means the loops run: every worker is at its first timestamp */
	pthread_barrier_wait(&g.measuring);
	const char *pio_method = "outb";
	for (int i = 0; i < g.ncpus; i++)
		if (g.workers[i].cls == CLS_PIO && g.workers[i].port_fd >= 0)
			pio_method = "devport";

	struct sb b = { 0 };
	sb_printf(&b, "{\"ev\":\"ready\",\"touched_mib\":%lu,\"prefault_ms\":%.1f,\"requested_mib\":%ld,"
		  "\"available_mib\":%ld,\"pio_method\":\"%s\",\"loops\":[", (unsigned long)(g.total_bytes / MIB), ms,
		  g.touch_mib, avail_mib, pio_method);
	for (int i = 0; i < g.ncpus; i++)
		sb_printf(&b, "%s\"%s\"", i ? "," : "", cls_names[g.workers[i].cls]);
	sb_printf(&b, "]");
	if (g.nalias)
		sb_printf(&b, ",\"alias\":{\"devices\":%d,\"bar_mib\":%lu,\"total_mib\":%lu,\"window_mib\":%lu,"
			  "\"first_gpa\":%llu}", g.nalias, (unsigned long)(g.alias[0].size / MIB),
			  (unsigned long)(g.alias_total / MIB), (unsigned long)(g.alias_window / MIB),
			  (unsigned long long)g.alias[0].start);
	sb_printf(&b, "}");
	send_line(&b);
	fprintf(stderr, "probe: ready: %lu MiB touched in %.1f ms\n", (unsigned long)(g.total_bytes / MIB), ms);

	command_loop();
	stop_loops();
	fprintf(stderr, "probe: quit\n");
	return 0;
}
