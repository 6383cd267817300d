/* The load generator's delivery reader in C (bench/loadgen.py --reader c).

   loadgen.py connects and upgrades the connections, then hands their sockets
   to this process, which reads them all from one epoll loop and checks every
   delivery the way loadgen.Client does (count, order, duplicates, latency =
   kernel receive time of the read - push time written in the item).

   Why: the Python reader needs ~30 us of CPU a read. At 200 msg/s to 1000
   connections it fell behind, so one read often held several of the server's
   writes, and a TCP read carries the kernel timestamp of its *last* segment:
   the earlier items in it were charged the time they waited in the socket.
   Here a read costs a few microseconds, so reads follow the server's writes.

   Usage: reader COUNT UNWRAP(0|1) STALL FDS_FILE LAT_FILE
     FDS_FILE  the inherited socket fds, one per line
     LAT_FILE  written at the end: every delivery's latency, int64 ns
   stdin commands, one per line:
     go     the producer starts: measure CPU and wall time from here
     stall  the producer is done: finish after STALL s without a delivery
   stdout: "warm" once every open connection got a warm-up item (the warm
   count and the "other" count start again from then), then at the end one
   JSON line of totals. It also finishes when every connection has all
   COUNT items (after a 0.3 s grace that catches duplicates), or on SIGTERM.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RECV_SIZE 65536
#define GRACE_S 0.3

typedef struct {
    int fd, closed, close_sent;
    unsigned char *buf;      /* unparsed bytes (a partial frame) */
    size_t len, cap;
    unsigned char *frag;     /* fragmented message being assembled */
    size_t flen, fcap;
    int in_frag;
    int64_t expected;        /* next seq in order; -1 after an anomaly */
    uint8_t *seen;           /* bitmap of seqs, only after the first anomaly */
    int64_t seen_n, maxseq;
    int64_t n, dup, ooo, bad, other, warm, last;
    int got_warm;            /* a warm-up item ever arrived */
} Conn;

static int64_t COUNT;
static int UNWRAP;
static int64_t *LAT;
static size_t LAT_N, LAT_CAP;
static volatile sig_atomic_t TERM;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) { perror("realloc"); exit(2); }
    return p;
}

static void append(unsigned char **b, size_t *len, size_t *cap, const unsigned char *d, size_t n) {
    if (*len + n > *cap) {
        *cap = (*len + n) * 2;
        *b = xrealloc(*b, *cap);
    }
    memcpy(*b + *len, d, n);
    *len += n;
}

static void lat(int64_t v) {
    if (LAT_N == LAT_CAP) {
        LAT_CAP = LAT_CAP ? LAT_CAP * 2 : 1 << 20;
        LAT = xrealloc(LAT, LAT_CAP * sizeof *LAT);
    }
    LAT[LAT_N++] = v;
}

static void send_masked(Conn *c, int op, const unsigned char *p, size_t n) {
    unsigned char f[2 + 4 + 125];
    uint32_t key = (uint32_t)rand();
    if (n > 125) n = 125;
    f[0] = 0x80 | op;
    f[1] = 0x80 | n;
    memcpy(f + 2, &key, 4);
    for (size_t i = 0; i < n; i++) f[6 + i] = p[i] ^ f[2 + i % 4];
    if (send(c->fd, f, 6 + n, MSG_NOSIGNAL) < 0) { /* the close below finds out */ }
}

static void close_conn(Conn *c, int epfd) {
    if (c->closed) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->closed = 1;
}

/* loadgen.Client.check: order, duplicates, range */
static void check(Conn *c, int64_t seq) {
    if (seq == c->expected && seq < COUNT) {
        c->expected = seq + 1;
        return;
    }
    if (!c->seen) {
        c->seen = calloc((size_t)(COUNT + 7) / 8, 1);
        if (!c->seen) { perror("calloc"); exit(2); }
        for (int64_t s = 0; s < c->expected; s++) c->seen[s >> 3] |= 1 << (s & 7);
        c->seen_n = c->expected;
        c->maxseq = c->expected - 1;
        c->expected = -1;
    }
    if (seq < 0 || seq >= COUNT) c->bad++;
    else if (c->seen[seq >> 3] & (1 << (seq & 7))) c->dup++;
    else {
        if (seq < c->maxseq) c->ooo++;
        c->seen[seq >> 3] |= 1 << (seq & 7);
        c->seen_n++;
        if (seq > c->maxseq) c->maxseq = seq;
    }
}

static int digits(const unsigned char *p, int n, int64_t *out) {
    int64_t v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 1;
}

/* loadgen.Client.payload with unwrap_json's fast path: a pushservice frame
   carries the item as a 64-byte plain string in "content"; other JSON frames
   (no "content") are counted as other. */
static void payload(Conn *c, const unsigned char *p, size_t n, int64_t now) {
    if (UNWRAP && n && p[0] == '{') {
        const unsigned char *i = memmem(p, n, "\"content\":", 10);
        if (!i) { c->other++; return; }
        size_t j = (size_t)(i - p) + 10;
        if (j < n && p[j] == ' ') j++;
        if (j + 65 < n && p[j] == '"' && p[j + 65] == '"') {
            p += j + 1;
            n = 64;
        } else { c->bad++; return; }
    }
    if (n && p[0] == 'w') { c->warm++; c->got_warm = 1; return; }
    int64_t seq, ts;
    if (n < 32 || !digits(p, 12, &seq) || p[12] != ' ' || !digits(p + 13, 19, &ts)) {
        c->bad++;
        return;
    }
    lat(now - ts);
    c->n++;
    c->last = now;
    check(c, seq);
}

/* Parse the complete frames at the start of c->buf; keep the rest. */
static void frames(Conn *c, int64_t now, int epfd) {
    size_t pos = 0;
    while (c->len - pos >= 2 && !c->closed) {
        unsigned char *d = c->buf + pos;
        size_t avail = c->len - pos, hl = 2;
        uint64_t ln = d[1] & 0x7F;
        if (ln == 126) {
            if (avail < 4) break;
            ln = (uint64_t)d[2] << 8 | d[3];
            hl = 4;
        } else if (ln == 127) {
            if (avail < 10) break;
            ln = 0;
            for (int i = 0; i < 8; i++) ln = ln << 8 | d[2 + i];
            hl = 10;
        }
        int masked = d[1] & 0x80;
        if (masked) hl += 4;
        if (avail < hl + ln) break;
        unsigned char *p = d + hl;
        if (masked) {            /* servers must not mask */
            c->bad++;
            for (uint64_t i = 0; i < ln; i++) p[i] ^= d[hl - 4 + i % 4];
        }
        int op = d[0] & 0x0F, fin = d[0] & 0x80;
        if (op == 0x9) {
            if (!c->close_sent) send_masked(c, 0xA, p, ln);
        } else if (op == 0x8) {
            if (!c->close_sent) {
                c->close_sent = 1;
                send_masked(c, 0x8, p, ln >= 2 ? 2 : 0);
            }
            close_conn(c, epfd);
        } else if (op == 0xA) {
        } else if (op == 0x1 || op == 0x2) {
            if (fin) payload(c, p, ln, now);
            else { c->flen = 0; c->in_frag = 1; append(&c->frag, &c->flen, &c->fcap, p, ln); }
        } else if (op == 0x0 && c->in_frag) {
            append(&c->frag, &c->flen, &c->fcap, p, ln);
            if (fin) { c->in_frag = 0; payload(c, c->frag, c->flen, now); }
        } else c->bad++;
        pos += hl + ln;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
}

static void on_readable(Conn *c, int epfd) {
    if (c->cap - c->len < RECV_SIZE) {
        c->cap = c->len + RECV_SIZE;
        c->buf = xrealloc(c->buf, c->cap);
    }
    char anc[64];
    struct iovec iov = {c->buf + c->len, RECV_SIZE};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = anc, .msg_controllen = sizeof anc};
    ssize_t r = recvmsg(c->fd, &m, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        close_conn(c, epfd);
        return;
    }
    if (r == 0) { close_conn(c, epfd); return; }
    int64_t now = 0;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h))
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec t;
            memcpy(&t, CMSG_DATA(h), sizeof t);
            now = (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
        }
    if (!now) now = now_ns();
    c->len += (size_t)r;
    frames(c, now, epfd);
}

static void on_term(int sig) { (void)sig; TERM = 1; }

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: reader COUNT UNWRAP STALL FDS_FILE LAT_FILE\n");
        return 2;
    }
    COUNT = atoll(argv[1]);
    UNWRAP = atoi(argv[2]);
    double stall = atof(argv[3]);
    signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    FILE *ff = fopen(argv[4], "r");
    if (!ff) { perror(argv[4]); return 2; }
    size_t nc = 0, ccap = 1024;
    Conn *cs = calloc(ccap, sizeof *cs);
    int fd;
    while (fscanf(ff, "%d", &fd) == 1) {
        if (nc == ccap) { cs = xrealloc(cs, 2 * ccap * sizeof *cs); memset(cs + ccap, 0, ccap * sizeof *cs); ccap *= 2; }
        cs[nc].fd = fd;
        nc++;
    }
    fclose(ff);
    int epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = UINT64_MAX;
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    for (size_t i = 0; i < nc; i++) {
        ev.data.u64 = i;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) { perror("epoll_ctl"); return 2; }
    }
    int warm_said = 0, stall_on = 0, stalled = 0;
    double wall = 0, cpu = 0;         /* from "go" to the last expected item */
    double t_go = mono(), cpu_go = cpu_s(), last_progress = mono(), done_at = 0, last_scan = 0;
    int64_t total = 0, last_total = -1;
    char cmd[64];
    size_t cmd_len = 0;
    struct epoll_event evs[512];
    while (!TERM) {
        int k = epoll_wait(epfd, evs, 512, 20);
        for (int e = 0; e < k; e++) {
            if (evs[e].data.u64 == UINT64_MAX) {
                ssize_t r = read(0, cmd + cmd_len, sizeof cmd - 1 - cmd_len);
                if (r <= 0) { TERM = 1; break; }   /* loadgen went away */
                cmd_len += (size_t)r;
                cmd[cmd_len] = 0;
                char *nl;
                while ((nl = strchr(cmd, '\n'))) {
                    *nl = 0;
                    if (!strcmp(cmd, "go")) { t_go = mono(); cpu_go = cpu_s(); }
                    else if (!strcmp(cmd, "stall")) { stall_on = 1; last_progress = mono(); }
                    cmd_len -= (size_t)(nl + 1 - cmd);
                    memmove(cmd, nl + 1, cmd_len + 1);
                }
                continue;
            }
            on_readable(&cs[evs[e].data.u64], epfd);
        }
        double t = mono();
        if (t - last_scan < 0.01) continue;      /* totals: at most every 10 ms */
        last_scan = t;
        if (!warm_said) {
            size_t w = 0;
            for (size_t i = 0; i < nc; i++) w += cs[i].warm > 0 || cs[i].closed;
            if (w == nc) {
                warm_said = 1;
                for (size_t i = 0; i < nc; i++) cs[i].other = cs[i].warm = 0;
                printf("warm\n");
                fflush(stdout);
            }
            continue;
        }
        total = 0;
        int64_t unique = 0;
        for (size_t i = 0; i < nc; i++) {
            total += cs[i].n;
            unique += cs[i].seen ? cs[i].seen_n : cs[i].expected;
        }
        if (total != last_total) { last_total = total; last_progress = t; }
        if (!done_at && unique >= COUNT * (int64_t)nc) {
            done_at = t;
            wall = t - t_go;
            cpu = cpu_s() - cpu_go;
        }
        if (done_at && t - done_at >= GRACE_S) break;
        if (stall_on && t - last_progress > stall) { stalled = 1; break; }
    }
    if (!done_at) { wall = mono() - t_go; cpu = cpu_s() - cpu_go; }
    FILE *lf = fopen(argv[5], "wb");
    if (!lf || fwrite(LAT, sizeof *LAT, LAT_N, lf) != LAT_N || fclose(lf)) { perror(argv[5]); return 2; }
    int64_t n = 0, unique = 0, dup = 0, ooo = 0, bad = 0, other = 0, closed = 0, last = 0, cold = 0;
    for (size_t i = 0; i < nc; i++) {
        Conn *c = &cs[i];
        n += c->n; dup += c->dup; ooo += c->ooo; bad += c->bad; other += c->other;
        unique += c->seen ? c->seen_n : c->expected;
        closed += c->closed;
        cold += !c->got_warm;
        if (c->last > last) last = c->last;
    }
    printf("{\"deliveries\": %lld, \"unique\": %lld, \"duplicates\": %lld, \"out_of_order\": %lld, "
           "\"bad_frames\": %lld, \"other_frames\": %lld, \"closed\": %lld, \"last_ns\": %lld, "
           "\"never_warm\": %lld, \"complete\": %s, \"stalled\": %s, \"cpu_s\": %.6f, \"wall_s\": %.6f}\n",
           (long long)n, (long long)unique, (long long)dup, (long long)ooo, (long long)bad,
           (long long)other, (long long)closed, (long long)last, (long long)cold,
           done_at ? "true" : "false", stalled ? "true" : "false", cpu, wall);
    return 0;
}
