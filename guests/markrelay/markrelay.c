/*
 * migstall mark relay: the probe channel, timestamped on the QEMU host's clock.
 *
 *   migstall-markrelay SOCKET
 *
 * Connects to the guest probe's channel (the QEMU chardev unix socket SOCKET)
 * and copies bytes both ways: standard input -> socket, socket -> standard
 * output.  The harness runs it on the machine that runs QEMU (through
 * Host.open_stream), so that the clock-alignment marks are stamped with that
 * machine's CLOCK_REALTIME, the clock of QEMU's own trace lines and QMP event
 * timestamps, and not with the clock of the machine running the harness:
 *
 *   - a line "mark ID NS" from the harness is sent on as "mark ID <now>",
 *     stamped right before the write;
 *   - a probe line carrying "ev":"mark" (the echo, a short JSON object) gets
 *     ,"relay_recv_ns":<now> inserted before its closing brace, stamped right
 *     after the read that completed it.
 *
 * Every other byte passes through unchanged (a "stalls" line of a dump can be
 * hundreds of MiB: only the first HEAD_MAX bytes of a line are held back to
 * look for the mark event).  Once connected it writes one line of its own,
 * {"ev":"relay","clock":"realtime","pid":N}.  The relay exits 0 when either side reaches end of
 * file, 1 on an error (a message on stderr).  It never waits on a timer: it
 * blocks in poll() on the two descriptors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 512            /* a mark echo is well under 200 bytes */
#define BUF 65536

static uint64_t realtime_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "migstall-markrelay: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		p += k;
		n -= (size_t)k;
	}
}

/* One direction's line state. */
struct dir {
	int in, out;
	char head[HEAD_MAX + 64];       /* the start of the current line, held back */
	size_t nhead;
	int passing;                    /* the current line outgrew head: pass bytes through */
};

/* harness -> probe: rewrite "mark ID NS" with our clock. */
static void flush_cmd(struct dir *d)
{
	unsigned long long id, ns;
	char tail;
	d->head[d->nhead] = '\0';
	if (sscanf(d->head, "mark %llu %llu%c", &id, &ns, &tail) == 3 && tail == '\n') {
		char line[96];
		int k = snprintf(line, sizeof line, "mark %llu %llu\n", id, (unsigned long long)realtime_ns());
		write_all(d->out, line, (size_t)k);
	} else {
		write_all(d->out, d->head, d->nhead);
	}
	d->nhead = 0;
}

/* probe -> harness: add relay_recv_ns to a mark echo. */
static void flush_event(struct dir *d, uint64_t t_read)
{
	d->head[d->nhead] = '\0';
	char *brace = d->nhead >= 2 ? strrchr(d->head, '}') : NULL;
	if (brace && strstr(d->head, "\"ev\":\"mark\"") && brace[1] == '\n') {
		char stamp[48];
		int k = snprintf(stamp, sizeof stamp, ",\"relay_recv_ns\":%llu}\n", (unsigned long long)t_read);
		write_all(d->out, d->head, (size_t)(brace - d->head));
		write_all(d->out, stamp, (size_t)k);
	} else {
		write_all(d->out, d->head, d->nhead);
	}
	d->nhead = 0;
}

/* Move what is readable on d->in; 0 at end of file. */
static int pump(struct dir *d, int is_cmd)
{
	char buf[BUF];
	ssize_t n = read(d->in, buf, sizeof buf);
	uint64_t t = realtime_ns();
	if (n < 0) {
		if (errno == EINTR || errno == EAGAIN)
			return 1;
		die("read");
	}
	if (n == 0) {
		if (d->nhead)
			write_all(d->out, d->head, d->nhead);
		return 0;
	}
	size_t i = 0;
	while (i < (size_t)n) {
		char *nl = memchr(buf + i, '\n', (size_t)n - i);
		size_t upto = nl ? (size_t)(nl - buf) + 1 : (size_t)n;
		size_t len = upto - i;
		if (d->passing) {
			write_all(d->out, buf + i, len);
		} else if (d->nhead + len <= HEAD_MAX) {
			memcpy(d->head + d->nhead, buf + i, len);
			d->nhead += len;
			if (nl) {
				if (is_cmd)
					flush_cmd(d);
				else
					flush_event(d, t);
			}
		} else {
			/* too long to be a mark line: pass it through from here on */
			write_all(d->out, d->head, d->nhead);
			d->nhead = 0;
			write_all(d->out, buf + i, len);
			d->passing = 1;
		}
		if (nl)
			d->passing = 0;
		i = upto;
	}
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: migstall-markrelay SOCKET\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(argv[1]) >= sizeof sa.sun_path) {
		fprintf(stderr, "migstall-markrelay: socket path too long: %s\n", argv[1]);
		return 2;
	}
	strcpy(sa.sun_path, argv[1]);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket");
	if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
		fprintf(stderr, "migstall-markrelay: cannot connect to %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	/* the harness waits for this line: the relay is connected, and on which clock it stamps */
	char hello[96];
	int k = snprintf(hello, sizeof hello, "{\"ev\":\"relay\",\"clock\":\"realtime\",\"pid\":%d}\n", (int)getpid());
	write_all(1, hello, (size_t)k);
	struct dir up = { .in = 0, .out = s }, down = { .in = s, .out = 1 };
	struct pollfd pfd[2] = { { .fd = 0, .events = POLLIN }, { .fd = s, .events = POLLIN } };
	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (pfd[1].revents & (POLLIN | POLLHUP | POLLERR))
			if (!pump(&down, 0))
				return 0;
		if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))
			if (!pump(&up, 1))
				return 0;
	}
}
