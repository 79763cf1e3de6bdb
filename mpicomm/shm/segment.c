/* mpicomm.shm._core, the segment protocol: see segment.h. Waits, direct reads, the collectives. */
#include "segment.h" /* first: Python.h comes before the system headers */

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <emmintrin.h>
#endif


#define SPIN 256 /* busy polls of a late peer before yielding the core between polls */
#define YIELD_FOR 1e-3 /* seconds of yielding between polls before sleeping between them ... */
#define NAP_FIRST 20000L /* ... first for this many nanoseconds, doubling up to NAP_MOST */
#define NAP_MOST 1000000L
#define SIGNALS_EVERY 0.01 /* seconds between checks for a signal Python must handle */
#define STREAM_FROM ((size_t)1 << 20) /* bytes from which a direct gather streams its own part */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Whether process pid is gone (no such process, or a zombie waiting to be reaped). */
static int process_gone(int pid) {
    if (pid <= 0) return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH) return 1;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

uint64_t describe(int op, long extra, const size_t *counts, int n) {
    uint64_t h = 0xcbf29ce484222325ull ^ ((uint64_t)op << 56) ^ (uint64_t)(extra + 1);
    for (int i = 0; i < n; i++) h = (h ^ (uint64_t)counts[i]) * 0x100000001b3ull + (h >> 29);
    return h;
}

/* After the wait for a collective's first stage: the peers whose header differs from this rank's
   (another call, or other sizes or kind). Every rank finds at least one when any two differ, so
   every rank fails at this same stage, having read nothing of its peers; then no peer reads any
   slot before the next call's first stage, so both buffers are free and every rank restarts
   the rounds at 0: the segment stays in step. 0, or -1 with *fail set. */
static int check_headers(Segment *s, uint64_t target, Failure *fail) {
    s->check = 0;
    fail->count = 0;
    for (int q = 0; q < s->world; q++) {
        if (q == s->rank) continue;
        uint64_t *h = header_of(s, q, target);
        if (h[0] != target || h[1] != s->desc) fail->ranks[fail->count++] = q;
    }
    if (!fail->count) return 0;
    fail->what = "mismatch";
    fail->seconds = 0;
    s->round = 0;
    return -1;
}

unsigned long main_thread;

/* Run the Python handlers of signals that arrived during a wait (Ctrl-C, a SIGTERM handler), with
   the GIL taken back for the purpose; a collective on this segment from a handler is refused
   (busy). 0, or -1 with the handler's exception set and *fail "interrupted": the rank leaves its
   peers mid-call, so the segment is broken. A handler that closed the segment ends the wait too. */

static int interrupted(Segment *s, Failure *fail) {
    if (!s->released || PyThread_get_thread_ident() != main_thread) return 0;
    int busy = s->busy;
    PyEval_RestoreThread(s->released);
    s->busy = 1;
    int rc = PyErr_CheckSignals();
    s->busy = busy;
    s->released = PyEval_SaveThread();
    if (rc == 0 && !s->broken) return 0;
    fail->what = rc ? "interrupted" : "broken";
    fail->count = 0;
    fail->seconds = 0;
    s->broken = 1;
    return -1;
}

/* Wait until every peer has published this rank's stage. 0, or -1 with *fail set. */
int await_peers(Segment *s, Failure *fail) {
    uint64_t target = s->stage;
    int w = s->world;
    for (int r = 0; r < w; r++) {
        if (r == s->rank) continue;
        uint64_t *peer = stage_of(s, r);
        if (__atomic_load_n(peer, __ATOMIC_ACQUIRE) >= target) continue;
        /* The slow path: spin, then yield the core, then sleep between polls (an oversubscribed
           or idle rank leaves the core to others, docs/shm.md "Waiting"); check the clock, the
           peers' pids and pending signals now and then. */
        double start = now_s(), next_check = start + 0.05, next_signals = start + SIGNALS_EVERY;
        long spins = 0, nap = 0;
        while (__atomic_load_n(peer, __ATOMIC_ACQUIRE) < target) {
            if (++spins < SPIN) {
                cpu_relax();
                continue;
            }
            if (s->holds_gil && !s->released) {
                /* A long wait: let this process's other threads run (one of them may be the
                   peer another rank waits for, in another communicator). */
                s->released = PyEval_SaveThread();
            }
            if (nap) {
                struct timespec ts = {0, nap};
                nanosleep(&ts, NULL);
                nap = nap * 2 < NAP_MOST ? nap * 2 : NAP_MOST;
            } else {
                sched_yield();
                if ((spins & 63) != 0) continue;
            }
            double t = now_s();
            if (!nap && t - start > YIELD_FOR) nap = NAP_FIRST;
            if (t >= next_signals) {
                next_signals = t + SIGNALS_EVERY;
                if (interrupted(s, fail)) return -1;
            }
            int timed_out = s->timeout > 0 && t - start > s->timeout;
            if (!timed_out && t < next_check) continue;
            next_check = t + 0.05;
            fail->count = 0;
            for (int q = 0; q < w; q++) { /* who is late, and is any of them dead? */
                if (q == s->rank || __atomic_load_n(stage_of(s, q), __ATOMIC_ACQUIRE) >= target)
                    continue;
                if (process_gone(s->pids[q])) fail->ranks[fail->count++] = q;
            }
            if (fail->count) {
                fail->what = "died";
                fail->seconds = t - start;
                s->broken = 1;
                return -1;
            }
            if (timed_out) {
                for (int q = 0; q < w; q++)
                    if (q != s->rank && __atomic_load_n(stage_of(s, q), __ATOMIC_ACQUIRE) < target)
                        fail->ranks[fail->count++] = q;
                fail->what = "timeout";
                fail->seconds = s->timeout;
                s->broken = 1;
                return -1;
            }
        }
    }
    return s->check == target ? check_headers(s, target, fail) : 0;
}

/* Publish the next stage and wait until every peer has published it. 0, or -1 with *fail set. */
int step(Segment *s, Failure *fail) {
    announce(s);
    return await_peers(s, fail);
}

/* ------------------------------------------------------------------ direct reads (large messages) */

/* Copy len bytes at peer q's address `from` to `to`. 0, or -1 with *fail set ("died" when the
   peer is gone, else "broken": its memory was unreadable, which only a failing peer causes). */
static int peer_read(Segment *s, int q, void *to, uint64_t from, size_t len, Failure *fail) {
    while (len > 0) {
        struct iovec local = {to, len}, remote = {(void *)(uintptr_t)from, len};
        ssize_t got = process_vm_readv(s->pids[q], &local, 1, &remote, 1, 0);
        if (got <= 0) {
            if (got < 0 && errno == EINTR) continue;
            fail->count = 1;
            fail->ranks[0] = q;
            fail->what = got < 0 && errno == ESRCH ? "died" : "broken";
            fail->seconds = 0;
            s->broken = 1;
            return -1;
        }
        to = (char *)to + got;
        from += (uint64_t)got;
        len -= (size_t)got;
    }
    return 0;
}

/* Publish this call's input and output addresses, then wait for every peer's. */
static int publish(Segment *s, const void *in, const void *out, Failure *f) {
    uint64_t *mine = addr_of(s, s->rank);
    mine[0] = (uint64_t)(uintptr_t)in;
    mine[1] = (uint64_t)(uintptr_t)out;
    return step(s, f); /* its release store publishes the addresses */
}

/* Rank me sums, in rank order, elements [lo, hi) of every rank's input (published) into
   dst[0, hi - lo) (which may be that part of its own input: element i is read before it is
   written), CHUNK bytes per peer at a time through the scratch buffer. */
static int direct_sum(Segment *s, const char *src, char *dst, size_t lo, size_t hi, int kind,
                      Failure *f) {
    size_t isz = kind_size[kind], per = CHUNK / isz;
    int w = s->world, me = s->rank;
    const void *parts[MAXW];
    sum_fn sum = sum_of[kind];
    for (size_t k = lo; k < hi; k += per) {
        size_t m = hi - k < per ? hi - k : per;
        for (int q = 0; q < w; q++) {
            if (q == me) {
                parts[q] = src + k * isz;
                continue;
            }
            char *buf = s->scratch + (size_t)q * CHUNK;
            if (peer_read(s, q, buf, addr_of(s, q)[0] + k * isz, m * isz, f)) return -1;
            parts[q] = buf;
        }
        sum(dst + (k - lo) * out_size[kind], NULL, parts, w, m);
    }
    return 0;
}

/* all_reduce, direct: rank r sums part r of every input into its output, then copies the other
   parts from their owners' outputs. The last wait keeps every rank's tensors alive until no peer
   reads them any more. */
static int all_reduce_direct(Segment *s, const char *src, char *dst, size_t n, int kind,
                             Failure *f) {
    size_t isz = kind_size[kind];
    int w = s->world, me = s->rank;
    size_t unit = n / (size_t)w / 64 * 64; /* part boundaries on 64-element multiples */
    if (publish(s, src, dst, f)) return -1;
    size_t lo = unit * (size_t)me, hi = me == w - 1 ? n : lo + unit;
    if (direct_sum(s, src, dst + lo * isz, lo, hi, kind, f)) return -1;
    if (step(s, f)) return -1;
    for (int q = 0; q < w; q++) {
        if (q == me) continue;
        size_t a = unit * (size_t)q, b = q == w - 1 ? n : a + unit;
        if (peer_read(s, q, dst + a * isz, addr_of(s, q)[1] + a * isz, (b - a) * isz, f)) return -1;
    }
    return step(s, f);
}

/* reduce_scatter, direct: this rank sums elements [lo, +count) of every input into dst. */
static int reduce_scatter_direct(Segment *s, const char *src, char *dst, size_t lo, size_t count,
                                 int kind, Failure *f) {
    if (publish(s, src, dst, f)) return -1;
    if (direct_sum(s, src, dst, lo, lo + count, kind, f)) return -1;
    return step(s, f);
}

/* memcpy of a large block with streaming stores on x86-64: the destination's lines are neither
   read first nor left in the cache (glibc streams only past a threshold scaled to the last-level
   cache, which on large server caches is never reached here). Faster for the own part of a direct
   all_gather from 16 MiB (benchmarks/results/history/2026-12-03-shared-memory.md). */
static void copy_streaming(char *dst, const char *src, size_t n) {
#if defined(__x86_64__)
    size_t i = (64 - ((uintptr_t)dst & 63)) & 63; /* bytes up to dst's next line */
    if (i > n) i = n;
    memcpy(dst, src, i);
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
    _mm_sfence(); /* the streamed stores are ordered before this rank's next release store */
#else
    memcpy(dst, src, n);
#endif
}

/* gatherv / all_gather, direct: every receiving rank copies rank q's input (counts[q] bytes)
   to dst + displ[q]. */
static int gatherv_direct(Segment *s, const char *src, char *dst, const size_t *counts,
                          const size_t *displ, int root, Failure *f) {
    int w = s->world, me = s->rank;
    if (publish(s, src, dst, f)) return -1;
    if (root < 0 || root == me) {
        for (int q = 0; q < w; q++) {
            if (q == me && counts[q] >= STREAM_FROM)
                copy_streaming(dst + displ[q], src, counts[q]);
            else if (q == me)
                memcpy(dst + displ[q], src, counts[q]);
            else if (counts[q] && peer_read(s, q, dst + displ[q], addr_of(s, q)[0], counts[q], f))
                return -1;
        }
    }
    return step(s, f);
}

/* broadcast, direct: every other rank copies root's buffer. */
static int broadcast_direct(Segment *s, char *buf, size_t nbytes, int root, Failure *f) {
    if (publish(s, buf, buf, f)) return -1;
    if (s->rank != root && peer_read(s, root, buf, addr_of(s, root)[0], nbytes, f)) return -1;
    return step(s, f);
}

/* Whether this rank can read every peer's probe word directly (collective: one wait). */
int probe_direct(Segment *s, Failure *f) {
    begin(s, describe(OP_PROBE, 0, NULL, 0));
    if (step(s, f)) return -1; /* every rank has published its probe address (at start) */
    for (int q = 0; q < s->world; q++) {
        if (q == s->rank) continue;
        uint64_t word = 0;
        struct iovec local = {&word, sizeof word};
        struct iovec remote = {(void *)(uintptr_t)*probe_of(s, q), sizeof word};
        if (process_vm_readv(s->pids[q], &local, 1, &remote, 1, 0) != (ssize_t)sizeof word ||
            word != PROBE)
            return 0;
    }
    return 1;
}

int fast_strings;

void find_fast_strings(void) {
#if defined(__x86_64__)
    unsigned eax, ebx, ecx, edx;
    fast_strings = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ebx & (1u << 9)); /* ERMS */
#endif
}

int finish_one_shot(Segment *s, const char *src, char *dst, size_t n, int kind, Failure *f) {
    const void *parts[MAXW];
    uint64_t round = s->round - 1;
    if (await_peers(s, f)) return -1;
    for (int r = 0; r < s->world; r++) parts[r] = r == s->rank ? src : slot_of(s, r, round);
    sum_of[kind](dst, NULL, parts, s->world, n);
    return 0;
}

/* all_reduce of n elements of kind: src -> dst (dst may be src itself: the sums read an element
   before they write it). */

int do_all_reduce(Segment *s, const char *src, char *dst, size_t n, int kind, Failure *f) {
    size_t isz = kind_size[kind], total = n * isz;
    int w = s->world, me = s->rank;
    sum_fn sum = sum_of[kind];
    const void *parts[MAXW];
    begin(s, describe(OP_SUM, kind, &n, 1));
    if (total == 0) return step(s, f);
    if (w > 1 && total >= (size_t)s->direct_from) return all_reduce_direct(s, src, dst, n, kind, f);
    if (total <= one_shot_max(s, kind)) { /* one-shot: every rank sums every slot */
        size_t per = align_down(s->slot, isz);
        for (size_t off = 0; off < total; off += per) {
            size_t m = total - off < per ? total - off : per;
            post_one_shot(s, src + off, m);
            if (finish_one_shot(s, src + off, dst + off, m / isz, kind, f)) return -1;
        }
        return 0;
    }
    /* Reduce-scatter + all-gather in the segment, a chunk of S bytes per round: every rank copies
       the parts its peers sum into its slot, rank r sums part r (its own from src) into dst and
       that part of its slot, then copies the other parts out of their owners' slots. The own part
       is not copied: it comes from src (measured: benchmarks/results/history/2026-12-03-shared-memory.md). */
    size_t per = align_down(s->slot, (size_t)ALIGN * isz);
    if (per == 0) per = align_down(s->slot, isz);
    for (size_t off = 0; off < total; off += per) {
        size_t m = total - off < per ? total - off : per, elems = m / isz;
        uint64_t round = s->round++;
        size_t unit = elems / (size_t)w / 16 * 16; /* part boundaries on 16-element multiples */
        size_t lo = unit * (size_t)me, hi = me == w - 1 ? elems : lo + unit;
        char *mine = slot_of(s, me, round);
        copy_in(mine, src + off, lo * isz);
        copy_in(mine + hi * isz, src + off + hi * isz, m - hi * isz);
        if (step(s, f)) return -1;
        for (int r = 0; r < w; r++)
            parts[r] = (r == me ? src + off : slot_of(s, r, round)) + lo * isz;
        sum(dst + off + lo * isz, slot_of(s, me, round) + lo * isz, parts, w, hi - lo);
        if (step(s, f)) return -1;
        for (int r = 0; r < w; r++) {
            if (r == me) continue;
            size_t a = unit * (size_t)r, b = r == w - 1 ? elems : a + unit;
            memcpy(dst + off + a * isz, slot_of(s, r, round) + a * isz, (b - a) * isz);
        }
    }
    return 0;
}

int finish_gather(Segment *s, const char *src, char *dst, const size_t *counts, size_t rows,
                         size_t stride, Failure *f) {
    uint64_t round = s->round - 1;
    size_t at = 0;
    if (await_peers(s, f)) return -1;
    for (int r = 0; r < s->world; r++) {
        const char *from = r == s->rank ? src : slot_of(s, r, round);
        size_t row = counts[r] / rows;
        for (size_t i = 0; i < rows; i++) memcpy(dst + i * stride + at, from + i * row, row);
        at += row;
    }
    return 0;
}

/* One round of a reduce_scatter through the slots, from element k of every destination's piece
   (counts[d] elements at displ[d] of src), in two halves (the hot path allocates its result
   between them): post copies the next `per` elements of each piece into part d of this rank's
   slot and publishes; finish waits and sums part `me` of every slot into dst + k. */
void post_scatter_round(Segment *s, const char *src, const size_t *counts, const size_t *displ,
                               size_t k, size_t per, size_t isz) {
    char *mine = slot_of(s, s->rank, s->round++);
    for (int d = 0; d < s->world; d++)
        if (counts[d] > k) {
            size_t m = counts[d] - k < per ? counts[d] - k : per;
            copy_in(mine + (size_t)d * per * isz, src + (displ[d] + k) * isz, m * isz);
        }
    announce(s);
}

int finish_scatter_round(Segment *s, char *dst, const size_t *counts, size_t k, size_t per,
                                int kind, Failure *f) {
    size_t isz = kind_size[kind];
    uint64_t round = s->round - 1;
    int me = s->rank;
    const void *parts[MAXW];
    if (await_peers(s, f)) return -1;
    if (counts[me] > k) {
        size_t m = counts[me] - k < per ? counts[me] - k : per;
        for (int r = 0; r < s->world; r++) parts[r] = slot_of(s, r, round) + (size_t)me * per * isz;
        sum_of[kind](dst + k * out_size[kind], NULL, parts, s->world, m);
    }
    return 0;
}

/* Rank r sums, over all ranks, elements [displ[r], +counts[r]) of src (kind) into dst. */
int do_reduce_scatter(Segment *s, const char *src, char *dst, const size_t *counts, int kind,
                             Failure *f) {
    size_t isz = kind_size[kind];
    int w = s->world, me = s->rank;
    size_t displ[MAXW], most, total = offsets(counts, w, displ, &most);
    begin(s, describe(OP_SCATTER, kind, counts, w));
    if (most == 0) return step(s, f);
    if (w > 1 && total * isz >= (size_t)s->direct_from)
        return reduce_scatter_direct(s, src, dst, displ[me], counts[me], kind, f);
    size_t per = scatter_part(s, kind);
    for (size_t k = 0; k < most; k += per) {
        post_scatter_round(s, src, counts, displ, k, per, isz);
        if (finish_scatter_round(s, dst, counts, k, per, kind, f)) return -1;
    }
    return 0;
}

/* Rank r's counts[r] bytes to dst + displ[r] on every rank (root < 0) or on root only. */
int do_gatherv(Segment *s, const char *src, char *dst, const size_t *counts, int root,
                      Failure *f) {
    int w = s->world, me = s->rank;
    size_t displ[MAXW], most, total = offsets(counts, w, displ, &most);
    begin(s, describe(OP_GATHER, root, counts, w));
    if (most == 0) return step(s, f);
    if (w > 1 && total >= (size_t)s->direct_from)
        return gatherv_direct(s, src, dst, counts, displ, root, f);
    size_t per = s->slot;
    int reads = root < 0 || root == me;
    for (size_t k = 0; k < most; k += per) {
        uint64_t round = s->round++;
        if (counts[me] > k)
            copy_in(slot_of(s, me, round), src + k, counts[me] - k < per ? counts[me] - k : per);
        if (step(s, f)) return -1;
        if (!reads) continue;
        for (int r = 0; r < w; r++) {
            if (counts[r] <= k) continue;
            size_t m = counts[r] - k < per ? counts[r] - k : per;
            if (r == me)
                memcpy(dst + displ[r] + k, src + k, m);
            else
                memcpy(dst + displ[r] + k, slot_of(s, r, round), m);
        }
    }
    return 0;
}

/* root's nbytes of buf to buf on every other rank. */
int do_broadcast(Segment *s, char *buf, size_t nbytes, int root, Failure *f) {
    int me = s->rank;
    begin(s, describe(OP_BCAST, root, &nbytes, 1));
    if (nbytes == 0) return step(s, f);
    if (s->world > 1 && nbytes >= (size_t)s->direct_from) return broadcast_direct(s, buf, nbytes, root, f);
    for (size_t k = 0; k < nbytes; k += s->slot) {
        size_t m = nbytes - k < s->slot ? nbytes - k : s->slot;
        uint64_t round = s->round++;
        if (me == root) copy_in(slot_of(s, me, round), buf + k, m);
        if (step(s, f)) return -1;
        if (me != root) memcpy(buf + k, slot_of(s, root, round), m);
    }
    return 0;
}
