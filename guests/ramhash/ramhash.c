/*
 * migstall-ramhash: one 64-bit hash per 4 KiB page of a byte stream, to
 * compare guest RAM page by page after a migration.
 *
 *   migstall-ramhash [-n BYTES] [-t SECONDS] [-r] [-w] [INPUT [OUTPUT]]
 *
 * INPUT   the bytes to hash: a file or a FIFO ("-" or absent: standard input).
 *         A FIFO is opened read-write, so that no open for writing on it ever
 *         blocks while the hasher runs, and a writer closing it is not the end
 *         of the stream: several writers in turn (the harness issues one QMP
 *         `pmemsave` per guest RAM range into the same FIFO) make one stream,
 *         and -n says where it ends (so a FIFO needs -n).
 * OUTPUT  where the hashes go: one little-endian uint64 per page, in input
 *         order, nothing else ("-" or absent: standard output).
 * -n BYTES    stop after exactly BYTES bytes (a multiple of 4096); end of file
 *             before that is an error.  Without -n: read to end of file.
 * -t SECONDS  give up when no input arrives for SECONDS (exit 3).  Default 0:
 *             wait for ever.
 * -r          once INPUT is open, write the 8 bytes "RAMHASH\n" to OUTPUT
 *             before the first hash: a caller that sees them knows that
 *             opening the FIFO for writing will not block (QEMU's pmemsave
 *             opens it in its main loop, with the big QEMU lock held).
 * -w          watch standard input too (INPUT must then be a path): end of
 *             file there aborts at once (exit 4); bytes read there are
 *             ignored.  With Host.open_stream, closing the stream stops the
 *             hasher.
 *
 * Exit status: 0 all pages hashed; 1 I/O error, input shorter than -n, or a
 * partial last page without -n (the input must be whole pages: the message
 * names how many bytes the partial page had; the whole pages before it are
 * hashed and written); 2 usage; 3 idle timeout (-t); 4 aborted (-w).
 * Messages go to standard error.  Memory use is constant (a 1 MiB buffer):
 * RAM streams through, it is never held.
 *
 * The hash (written for migstall; constants are odd 64-bit numbers with well
 * mixed bits, K1 is the 64-bit golden ratio).  A page is 512 little-endian
 * uint64 words w[0..511], processed in 8 lanes; lane j (0..7) takes the words
 * w[i] with i % 8 == j, in order:
 *
 *     s_j = LANE0 + j * K1                      (the same for every page)
 *     for each of its words w:  s_j = (s_j ^ w) * K1;  s_j ^= s_j >> 29
 *     h = SEED
 *     for j = 0..7:             h = (h ^ s_j) * K2;   h ^= h >> 32
 *     h ^= h >> 29; h *= K3; h ^= h >> 32       (finaliser)
 *
 * all arithmetic modulo 2^64.  Nothing depends on where the page is, so
 * identical pages hash equal.  Every step is a bijection of the running state
 * for a fixed word and of the word for a fixed state, so two pages that
 * differ in exactly one word (e.g. one flipped byte) always hash differently;
 * other differences collide with probability about 2^-64 per page for the
 * kind of data RAM holds (it is not a cryptographic hash: do not use it
 * against an adversary).  The 8 independent lanes keep the multiplier busy:
 * several GiB/s per core, far more than the pipe from QEMU delivers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define LANES 8
#define BUF (1 << 20)                 /* input buffer: 256 pages */
#define PIPE_SIZE (1 << 20)           /* asked of a FIFO/pipe input (F_SETPIPE_SZ) */
#define READY "RAMHASH\n"

#define K1 0x9E3779B97F4A7C15ULL
#define K2 0xD6E8FEB86659FD93ULL
#define K3 0xA0761D6478BD642FULL
#define LANE0 0x243F6A8885A308D3ULL
#define SEED 0x13198A2E03707344ULL

#define EXIT_IO 1
#define EXIT_USAGE 2
#define EXIT_IDLE 3
#define EXIT_ABORT 4

static const char *prog = "migstall-ramhash";

static inline uint64_t le64(const unsigned char *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	return v;
}

static uint64_t hash_page(const unsigned char *p)
{
	uint64_t s[LANES];
	for (int j = 0; j < LANES; j++)
		s[j] = LANE0 + (uint64_t)j * K1;
	for (int i = 0; i < WORDS; i += LANES, p += 8 * LANES) {
		for (int j = 0; j < LANES; j++) {
			uint64_t x = (s[j] ^ le64(p + 8 * j)) * K1;
			s[j] = x ^ (x >> 29);
		}
	}
	uint64_t h = SEED;
	for (int j = 0; j < LANES; j++) {
		h = (h ^ s[j]) * K2;
		h ^= h >> 32;
	}
	h ^= h >> 29;
	h *= K3;
	h ^= h >> 32;
	return h;
}

static void put_le64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(void)
{
	fprintf(stderr, "usage: %s [-n BYTES] [-t SECONDS] [-r] [-w] [INPUT [OUTPUT]]\n", prog);
	exit(EXIT_USAGE);
}

/*
 * Wait until INPUT is readable.  Returns 0 when it is, or the exit status
 * (idle timeout, abort, error) when the hasher must stop.
 */
static int wait_input(int in, int watch, double idle_s)
{
	struct pollfd pfd[2] = { { .fd = in, .events = POLLIN }, { .fd = 0, .events = POLLIN } };
	int nfds = watch ? 2 : 1;
	double deadline = idle_s > 0 ? now_s() + idle_s : 0;
	char scratch[4096];

	for (;;) {
		int ms = -1;
		if (idle_s > 0) {
			double left = deadline - now_s();
			if (left <= 0) {
				fprintf(stderr, "%s: no input for %g s\n", prog, idle_s);
				return EXIT_IDLE;
			}
			ms = (int)(left * 1000) + 1;
		}
		int r = poll(pfd, (nfds_t)nfds, ms);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "%s: poll: %s\n", prog, strerror(errno));
			return EXIT_IO;
		}
		if (watch && pfd[1].revents) {
			ssize_t k = read(0, scratch, sizeof scratch);
			if (k == 0 || (k < 0 && errno != EINTR && errno != EAGAIN)) {
				fprintf(stderr, "%s: standard input closed: aborted\n", prog);
				return EXIT_ABORT;
			}
			continue;         /* ignored bytes: keep the idle deadline */
		}
		if (pfd[0].revents)
			return 0;         /* readable, or end of file / error: read() tells */
	}
}

int main(int argc, char **argv)
{
	unsigned long long want = 0;
	int have_want = 0, ready = 0, watch = 0, opt;
	double idle_s = 0;
	char *end;

	signal(SIGPIPE, SIG_IGN);
	while ((opt = getopt(argc, argv, "n:t:rw")) != -1) {
		switch (opt) {
		case 'n':
			errno = 0;
			want = strtoull(optarg, &end, 10);
			if (errno || *end || !*optarg || optarg[0] == '-' || want % PAGE) {
				fprintf(stderr, "%s: -n %s: not a multiple of %d bytes\n", prog, optarg, PAGE);
				return EXIT_USAGE;
			}
			have_want = 1;
			break;
		case 't':
			idle_s = strtod(optarg, &end);
			if (*end || !*optarg || idle_s < 0) {
				fprintf(stderr, "%s: -t %s: not a number of seconds\n", prog, optarg);
				return EXIT_USAGE;
			}
			break;
		case 'r':
			ready = 1;
			break;
		case 'w':
			watch = 1;
			break;
		default:
			usage();
		}
	}
	if (argc - optind > 2)
		usage();
	const char *in_path = optind < argc ? argv[optind] : "-";
	const char *out_path = optind + 1 < argc ? argv[optind + 1] : "-";
	int in_stdin = strcmp(in_path, "-") == 0;
	if (watch && in_stdin) {
		fprintf(stderr, "%s: -w watches standard input: INPUT must be a path\n", prog);
		return EXIT_USAGE;
	}

	int in = 0;
	struct stat st;
	if (!in_stdin) {
		if (stat(in_path, &st) < 0) {
			fprintf(stderr, "%s: %s: %s\n", prog, in_path, strerror(errno));
			return EXIT_IO;
		}
		int fifo = S_ISFIFO(st.st_mode);
		if (fifo && !have_want) {
			fprintf(stderr, "%s: %s is a FIFO: give its length with -n\n", prog, in_path);
			return EXIT_USAGE;
		}
		in = open(in_path, (fifo ? O_RDWR : O_RDONLY) | O_CLOEXEC);
		if (in < 0) {
			fprintf(stderr, "%s: %s: %s\n", prog, in_path, strerror(errno));
			return EXIT_IO;
		}
	}
	if (fstat(in, &st) == 0 && S_ISFIFO(st.st_mode))
		(void)fcntl(in, F_SETPIPE_SZ, PIPE_SIZE);   /* fewer wake-ups; the default 64 KiB works too */
	int out = 1;
	if (strcmp(out_path, "-") != 0) {
		out = open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (out < 0) {
			fprintf(stderr, "%s: %s: %s\n", prog, out_path, strerror(errno));
			return EXIT_IO;
		}
	}
	if (ready && write_all(out, READY, 8) < 0) {
		fprintf(stderr, "%s: write: %s\n", prog, strerror(errno));
		return EXIT_IO;
	}

	static unsigned char buf[BUF] __attribute__((aligned(PAGE)));
	static unsigned char hashes[(BUF / PAGE) * 8];
	unsigned long long got = 0;
	size_t held = 0;                  /* bytes of an incomplete page at the start of buf */
	for (;;) {
		if (have_want && got == want)
			break;
		if (idle_s > 0 || watch) {
			int rc = wait_input(in, watch, idle_s);
			if (rc)
				return rc;
		}
		size_t room = BUF - held;
		if (have_want && want - got < room)
			room = (size_t)(want - got);
		ssize_t k = read(in, buf + held, room);
		if (k < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fprintf(stderr, "%s: read %s: %s\n", prog, in_path, strerror(errno));
			return EXIT_IO;
		}
		if (k == 0)
			break;
		got += (unsigned long long)k;
		held += (size_t)k;
		size_t pages = held / PAGE;
		for (size_t i = 0; i < pages; i++)
			put_le64(hashes + 8 * i, hash_page(buf + i * PAGE));
		if (pages && write_all(out, hashes, pages * 8) < 0) {
			fprintf(stderr, "%s: write: %s\n", prog, strerror(errno));
			return EXIT_IO;
		}
		if (pages) {
			held -= pages * PAGE;
			memmove(buf, buf + pages * PAGE, held);
		}
	}
	if (have_want && got < want) {
		fprintf(stderr, "%s: input ended after %llu of %llu bytes\n", prog, got, want);
		return EXIT_IO;
	}
	if (held) {
		fprintf(stderr, "%s: input ends with a partial page of %zu bytes (after %llu whole pages)\n",
			prog, held, got / PAGE);
		return EXIT_IO;
	}
	if (out != 1 && close(out) < 0) {
		fprintf(stderr, "%s: %s: %s\n", prog, out_path, strerror(errno));
		return EXIT_IO;
	}
	return 0;
}
