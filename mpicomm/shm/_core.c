/* mpicomm.shm._core: the compiled hot loop of the intra-node shared-memory collectives.

   One Segment per communicator whose ranks share a node (docs/shm.md). Layout of the POSIX
   shared-memory mapping, for W ranks and slot size S:

       [control: W lines of CTRL bytes]  rank r's line holds its published stage number and pid
       [data: W x 2 slots of S bytes]     slot (r, b): rank r's buffer b (double buffering)

   Every collective is a sequence of rounds. In a round each rank writes into its own slot of
   buffer (round % 2), publishes stage + 1 (a release store), waits until every peer has
   published it too (acquire loads; spin, then yield), then reads peers' slots. A rank writes
   buffer b again only two rounds later, after every peer has published the round between,
   which it does only after finishing its reads of b: no extra synchronisation is needed.

   Large messages skip the slots where the kernel lets one process read another's memory
   (process_vm_readv, "direct" below; probed once per segment): each rank publishes the addresses
   of its input and output in its control line, and peers copy straight out of them. One copy per
   byte instead of two (into a slot, out of it), and three waits per call instead of two per slot.

   Sums follow docs/contract.md ("Sums"): rank order; bf16/fp16 accumulated in fp32 and rounded
   once to nearest even (NaN as torch: see f32_to_bf16); fp32/fp64 (and complex, as pairs) in their
   own type; integers wrap; bool is or. The Python side (transport.py) passes raw addresses,
   counts and a kind code (KIND_* below), so this module does not depend on torch's ABI. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <emmintrin.h>
#endif

#define CTRL 128 /* bytes per rank's control line (two cache lines: no false sharing) */
#define MAXW 64  /* the most ranks one segment serves */
#define BLK 256  /* elements summed per block (the accumulator stays in L1) */
#define ALIGN 64
#define SPIN 256 /* busy polls of a late peer before yielding the core between polls */
#define YIELD_FOR 1e-3 /* seconds of yielding between polls before sleeping between them ... */
#define NAP_FIRST 20000L /* ... first for this many nanoseconds, doubling up to NAP_MOST */
#define NAP_MOST 1000000L
#define SIGNALS_EVERY 0.01 /* seconds between checks for a signal Python must handle */
#define CHUNK (128 << 10) /* bytes a direct sum reads from one peer at a time (stays in L2) */
#define PROBE 0x6d7069636f6d6d31ull /* the word peers read to test direct reads */
#define STREAM_FROM ((size_t)1 << 20) /* bytes from which a direct gather streams its own part */

enum { KIND_BOOL = 1, KIND_I8, KIND_I16, KIND_I32, KIND_I64, KIND_F32, KIND_F64, KIND_BF16,
       KIND_F16 };

static const size_t kind_size[] = {0, 1, 1, 2, 4, 8, 4, 8, 2, 2};

/* ------------------------------------------------------------------ conversions (as torch) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* torch's vectorised conversion (ATen cvtfp32_bf16, AVX2/AVX512): round to nearest even, every
   NaN becomes 0xFFFF. The scalar c10 conversion gives 0x7FC0 instead; torch's CPU kernels use the
   vectorised one for all elements of a contiguous sum, so that is the one matched here (the unit
   tests compare bits with torch, NaN included). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0xFFFFu : (uint16_t)r;
}

/* fp16 <-> fp32 as c10's fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value (bit exact, round
   to nearest even), except that a NaN keeps its sign and the top 10 bits of its payload, quieted,
   as torch's vectorised conversion (F16C vcvtps2ph) does; c10's scalar code gives 0x7E00. */
static inline float fp32_from_bits(uint32_t w) {
    float f;
    memcpy(&f, &w, 4);
    return f;
}
static inline uint32_t fp32_to_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, 4);
    return w;
}

static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
    return fp32_from_bits(result);
}

static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign));
}

/* ------------------------------------------------------------------ sums in rank order */

/* dst (and dst2 when not NULL) = src[0] + src[1] + ... + src[w-1], n elements, left to right. */
#define SUM_SAME(NAME, T, OP)                                                                   \
    __attribute__((target_clones("avx512f", "avx2", "default"))) void NAME(                    \
        void *dst_, void *dst2_, const void **src_, int w, size_t n) {                          \
        T *dst = (T *)dst_, *dst2 = (T *)dst2_;                                                 \
        const T **src = (const T **)src_;                                                       \
        T acc[BLK];                                                                             \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK;                                             \
            const T *s0 = src[0] + i0;                                                          \
            if (w == 2) {                                                                       \
                const T *s1 = src[1] + i0;                                                      \
                for (size_t j = 0; j < m; j++) acc[j] = (T)(s0[j] OP s1[j]);                    \
            } else {                                                                            \
                for (size_t j = 0; j < m; j++) acc[j] = s0[j];                                  \
                for (int r = 1; r < w; r++) {                                                   \
                    const T *s = src[r] + i0;                                                   \
                    for (size_t j = 0; j < m; j++) acc[j] = (T)(acc[j] OP s[j]);                \
                }                                                                               \
            }                                                                                   \
            memcpy(dst + i0, acc, m * sizeof(T));                                               \
            if (dst2) memcpy(dst2 + i0, acc, m * sizeof(T));                                    \
        }                                                                                       \
    }

SUM_SAME(sum_bool, uint8_t, |)
SUM_SAME(sum_i8, uint8_t, +)
SUM_SAME(sum_i16, uint16_t, +)
SUM_SAME(sum_i32, uint32_t, +)
SUM_SAME(sum_i64, uint64_t, +)
SUM_SAME(sum_f32, float, +)
SUM_SAME(sum_f64, double, +)

#define SUM_NARROW(NAME, TO32, FROM32)                                                          \
    __attribute__((target_clones("avx512f", "avx2", "default"))) void NAME(                    \
        void *dst_, void *dst2_, const void **src_, int w, size_t n) {                          \
        uint16_t *dst = (uint16_t *)dst_, *dst2 = (uint16_t *)dst2_;                            \
        const uint16_t **src = (const uint16_t **)src_;                                         \
        float acc[BLK];                                                                         \
        uint16_t out[BLK];                                                                      \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK;                                             \
            const uint16_t *s0 = src[0] + i0;                                                   \
            for (size_t j = 0; j < m; j++) acc[j] = TO32(s0[j]);                                \
            for (int r = 1; r < w; r++) {                                                       \
                const uint16_t *s = src[r] + i0;                                                \
                for (size_t j = 0; j < m; j++) acc[j] += TO32(s[j]);                            \
            }                                                                                   \
            for (size_t j = 0; j < m; j++) out[j] = FROM32(acc[j]);                             \
            memcpy(dst + i0, out, m * 2);                                                       \
            if (dst2) memcpy(dst2 + i0, out, m * 2);                                            \
        }                                                                                       \
    }

SUM_NARROW(sum_bf16, bf16_to_f32, f32_to_bf16)
SUM_NARROW(sum_f16, f16_to_f32, f32_to_f16)

/* The same sums written for AVX-512 (16 floats per instruction; compilers vectorise the portable
   ones above only 8 wide, and the narrow-float conversions dominate): the conversions are the ones
   above, lane for lane, so the bits are the same. Chosen at import where the CPU has AVX-512. */
#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 static inline __m512 load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
AVX512 static inline __m256i to_bf16(__m512 v) { /* f32_to_bf16, 16 lanes */
    __m512i x = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, odd), _mm512_set1_epi32(0x7FFF)), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xFFFF), r);
    return _mm512_cvtepi32_epi16(r);
}
AVX512 static inline __m512 load_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
AVX512 static inline __m256i to_f16(__m512 v) { /* f32_to_f16, 16 lanes (vcvtps2ph) */
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

AVX512 static inline void store_bf16(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, to_bf16(v));
}
AVX512 static inline void store_f16(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, to_f16(v));
}
AVX512 static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
AVX512 static inline void store_f32(float *o, __m512 v) { _mm512_storeu_ps(o, v); }
static inline float as_f32(float v) { return v; }

/* SUM_SAME / SUM_NARROW above, 16 lanes at a time (the tail of a block element by element):
   T in memory, LOAD/STORE convert 16 of them to/from float32, TO32/FROM32 one. */
#define SUM_512(NAME, T, LOAD, STORE, TO32, FROM32)                                             \
    AVX512 static void NAME(void *dst_, void *dst2_, const void **src_, int w, size_t n) {   \
        T *dst = (T *)dst_, *dst2 = (T *)dst2_;                                                 \
        const T **src = (const T **)src_;                                                       \
        T out[BLK];                                                                             \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK, j = 0;                                      \
            T *o = dst2 ? out : dst + i0;                                                       \
            for (; j + 16 <= m; j += 16) {                                                      \
                __m512 a = LOAD(src[0] + i0 + j);                                               \
                for (int r = 1; r < w; r++) a = _mm512_add_ps(a, LOAD(src[r] + i0 + j));        \
                STORE(o + j, a);                                                                \
            }                                                                                   \
            for (; j < m; j++) {                                                                \
                float a = TO32(src[0][i0 + j]);                                                 \
                for (int r = 1; r < w; r++) a += TO32(src[r][i0 + j]);                          \
                o[j] = FROM32(a);                                                               \
            }                                                                                   \
            if (o == out) {                                                                     \
                memcpy(dst + i0, out, m * sizeof(T));                                           \
                memcpy(dst2 + i0, out, m * sizeof(T));                                          \
            }                                                                                   \
        }                                                                                       \
    }

SUM_512(sum_bf16_512, uint16_t, load_bf16, store_bf16, bf16_to_f32, f32_to_bf16)
SUM_512(sum_f16_512, uint16_t, load_f16, store_f16, f16_to_f32, f32_to_f16)
SUM_512(sum_f32_512, float, load_f32, store_f32, as_f32, as_f32)
#endif

typedef void (*sum_fn)(void *, void *, const void **, int, size_t);
static sum_fn sum_of[] = {NULL,    sum_bool, sum_i8,  sum_i16,  sum_i32,
                                sum_i64, sum_f32,  sum_f64, sum_bf16, sum_f16};

/* ------------------------------------------------------------------ the segment */

typedef struct {
    PyObject_HEAD
    char *base;          /* the mapping */
    size_t length;       /* its bytes */
    char *data;          /* first slot */
    size_t slot;         /* S: bytes per slot */
    int world, rank;
    uint64_t stage;      /* the last stage this rank published */
    uint64_t round;      /* rounds so far: buffer = round % 2 */
    double timeout;      /* seconds; <= 0: wait forever (dead peers are still noticed) */
    size_t oneshot_max;  /* all_reduce bytes up to which every rank sums everything ... */
    size_t oneshot_narrow_max; /* ... and for bf16/fp16 (converted to fp32 to sum) */
    int pids[MAXW];
    int broken;
    int gil_free_from;   /* bytes from which the GIL is released around a call */
    Py_ssize_t direct_from; /* bytes from which peers read each other's tensors directly */
    char *scratch;       /* CHUNK bytes per rank: peers' parts of a direct sum */
    uint64_t probe;      /* PROBE: what peers read to test direct reads */
    int fd;              /* the creator's descriptor until close_fd() (peers open it), else -1 */
    int busy;            /* a hot path allocating its result after its post: a re-entrant call
                            (from a finalizer) is refused */
    /* What the hot paths take and how they allocate (hot_config): torch.Tensor, {dtype: kind} of
       the dtypes summed here, {dtype: itemsize} of the dtypes gathered, torch.strided,
       torch.empty_like, torch.Tensor.new_empty, the allocator of sums of large_from bytes or
       more. NULL until configured. */
    PyObject *hot_type, *hot_kinds, *hot_sizes, *hot_strided, *hot_empty, *hot_new, *hot_empty_large;
    Py_ssize_t hot_large_from;
    uint64_t desc;       /* what this call's first stage must carry on every rank (begin) ... */
    uint64_t check;      /* ... checked at the wait for this stage (0: none pending) */
    int holds_gil;       /* this call runs with the GIL held (a small message) ... */
    PyThreadState *released; /* ... and released it once a wait grew long (restored by RUN) */
} Segment;

static PyObject *WaitError; /* args: (what: "timeout" | "died" | "mismatch" | "broken", ranks: tuple,
                               seconds) */

/* Rank r's control line: its stage (bytes 0-7), its pid (8-11), the call headers of its even and
   odd stages (16-31, 32-47: the stage and the call's description, see begin), the addresses of
   its input and output (48-63), all in the cache line its peers poll; its probe word's address
   (64-71). */
static inline uint64_t *stage_of(Segment *s, int r) { return (uint64_t *)(s->base + (size_t)r * CTRL); }
static inline int *pid_of(Segment *s, int r) { return (int *)(s->base + (size_t)r * CTRL + 8); }
static inline uint64_t *header_of(Segment *s, int r, uint64_t stage) {
    return (uint64_t *)(s->base + (size_t)r * CTRL + 16 + (size_t)(stage & 1) * 16);
}
static inline uint64_t *addr_of(Segment *s, int r) {
    return (uint64_t *)(s->base + (size_t)r * CTRL + 48);
}
static inline uint64_t *probe_of(Segment *s, int r) {
    return (uint64_t *)(s->base + (size_t)r * CTRL + 64);
}
static inline char *slot_of(Segment *s, int r, uint64_t round) {
    return s->data + ((size_t)r * 2 + (size_t)(round & 1)) * s->slot;
}

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

/* Failure report of a wait, turned into WaitError once the GIL is held again. */
typedef struct {
    const char *what;
    int ranks[MAXW];
    int count;
    double seconds;
} Failure;

/* What a collective's first stage carries (docs/shm.md, "Calls that disagree"): its operation,
   a kind or root, and its counts as this rank sees them, mixed into one word. Every rank computes
   it from its own arguments before its first post, so ranks that agree publish the same word. */
enum { OP_SUM = 1, OP_GATHER, OP_SCATTER, OP_BCAST, OP_BARRIER, OP_PROBE };

static uint64_t describe(int op, long extra, const size_t *counts, int n) {
    uint64_t h = 0xcbf29ce484222325ull ^ ((uint64_t)op << 56) ^ (uint64_t)(extra + 1);
    for (int i = 0; i < n; i++) h = (h ^ (uint64_t)counts[i]) * 0x100000001b3ull + (h >> 29);
    return h;
}

/* Start a collective described by desc: the header of the stage its first post publishes (a
   plain store, published by that post's release store), checked against every peer's at the
   wait for that stage (await_peers), before anything of theirs is read. */
static inline void begin(Segment *s, uint64_t desc) {
    uint64_t *h = header_of(s, s->rank, s->stage + 1);
    h[0] = s->stage + 1;
    h[1] = desc;
    s->desc = desc;
    s->check = s->stage + 1;
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

/* Publish the next stage (a release store: what this rank wrote before is visible to a peer that
   sees the stage). */
static inline void announce(Segment *s) {
    __atomic_store_n(stage_of(s, s->rank), ++s->stage, __ATOMIC_RELEASE);
}

/* Run the Python handlers of signals that arrived during a wait (Ctrl-C, a SIGTERM handler), with
   the GIL taken back for the purpose; a collective on this segment from a handler is refused
   (busy). 0, or -1 with the handler's exception set and *fail "interrupted": the rank leaves its
   peers mid-call, so the segment is broken. A handler that closed the segment ends the wait too. */
static unsigned long main_thread; /* Python runs signal handlers in this thread only */

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
static int await_peers(Segment *s, Failure *fail) {
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
static int step(Segment *s, Failure *fail) {
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
        sum(dst + (k - lo) * isz, NULL, parts, w, m);
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
   cache, which on large server caches is never reached here). Measured on 2 ranks, the own part of
   a direct all_gather: 16 MiB 2.1-2.4 -> 1.9 ms, 64 MiB 11.3-12.4 -> 9.9-10.4 ms. */
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
static int probe_direct(Segment *s, Failure *f) {
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


/* A rank's data into its own slot, whose lines its peers hold from reading the slot before.
   From MOVSB_FROM bytes on x86-64 with fast strings (ERMS), `rep movsb`, whose whole-line writes
   take the lines without fetching their old contents from the peers' caches, where glibc's
   vector copy of such sizes fetches them: 2 ranks, a one-shot all_reduce per call, float32 1.5 KiB
   1.98 -> 1.81 us, 2 KiB 2.24 -> 1.88 us; equal from 3 KiB, where glibc uses it too. */
#define MOVSB_FROM 1024
static int fast_strings;

static inline void copy_in(char *dst, const char *src, size_t n) {
#if defined(__x86_64__)
    if (n >= MOVSB_FROM && fast_strings) {
        __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* ------------------------------------------------------------------ the collectives (no GIL) */

static size_t align_down(size_t n, size_t unit) { return n / unit * unit; }

/* The largest all_reduce of kind that every rank sums whole (one-shot). */
static size_t one_shot_max(Segment *s, int kind) {
    return kind == KIND_BF16 || kind == KIND_F16 ? s->oneshot_narrow_max : s->oneshot_max;
}

/* The two halves of a one-shot all_reduce round (the hot path allocates its result between
   them, while the peers' data is on its way): post copies src into this rank's slot and
   publishes it; finish waits for the peers' and sums n elements into dst. A rank's own part of a
   sum comes from src, not from its slot copy (that copy is for its peers): one pass less. */
static void post_one_shot(Segment *s, const char *src, size_t total) {
    copy_in(slot_of(s, s->rank, s->round++), src, total);
    announce(s);
}

static int finish_one_shot(Segment *s, const char *src, char *dst, size_t n, int kind, Failure *f) {
    const void *parts[MAXW];
    uint64_t round = s->round - 1;
    if (await_peers(s, f)) return -1;
    for (int r = 0; r < s->world; r++) parts[r] = r == s->rank ? src : slot_of(s, r, round);
    sum_of[kind](dst, NULL, parts, s->world, n);
    return 0;
}

/* Whether an all_reduce of total bytes is one one-shot round (the hot path's split). */
static int fits_one_shot(Segment *s, size_t total, int kind) {
    return total > 0 && total <= one_shot_max(s, kind) && total <= s->slot &&
           (s->world == 1 || total < (size_t)s->direct_from);
}

/* all_reduce of n elements of kind: src -> dst (dst may be src itself: the sums read an element
   before they write it). */

static int do_all_reduce(Segment *s, const char *src, char *dst, size_t n, int kind, Failure *f) {
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
       that part of its slot, then copies the other parts out of their owners' slots. Skipping the
       own part of the copy: 2 ranks, float32 128 KiB 17.1 -> 16.1 us, bfloat16 20.1 -> 17.1 us. */
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

/* displ[r] = counts[0] + ... + counts[r-1]; returns the total, and the largest count in *most. */
static size_t offsets(const size_t *counts, int w, size_t *displ, size_t *most) {
    size_t off = 0;
    *most = 0;
    for (int r = 0; r < w; r++) {
        displ[r] = off;
        off += counts[r];
        if (counts[r] > *most) *most = counts[r];
    }
    return off;
}

/* The halves of an all_gather(v) that fits one round of the slots (post: post_one_shot's copy of
   this rank's counts[me] bytes; the hot paths allocate the result between the two). Rank r's
   block is `rows` rows of counts[r] / rows bytes, and its row i goes to
   dst + i * stride + (the row bytes of the ranks before r): rows == 1 gives the blocks in rank
   order (all_gatherv); more gives torch.cat of equal blocks along an inner dimension (stride:
   W rows), with no second pass to move that dimension. */
static int fits_gather(Segment *s, const size_t *counts) {
    size_t displ[MAXW], most, total = offsets(counts, s->world, displ, &most);
    return total > 0 && most <= s->slot && (s->world == 1 || total < (size_t)s->direct_from);
}

static int finish_gather(Segment *s, const char *src, char *dst, const size_t *counts, size_t rows,
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

/* Elements of kind per destination's part of a slot in a reduce_scatter round. */
static size_t scatter_part(Segment *s, int kind) {
    return align_down(s->slot / (size_t)s->world, (size_t)ALIGN) / kind_size[kind];
}

/* One round of a reduce_scatter through the slots, from element k of every destination's piece
   (counts[d] elements at displ[d] of src), in two halves (the hot path allocates its result
   between them): post copies the next `per` elements of each piece into part d of this rank's
   slot and publishes; finish waits and sums part `me` of every slot into dst + k. */
static void post_scatter_round(Segment *s, const char *src, const size_t *counts, const size_t *displ,
                               size_t k, size_t per, size_t isz) {
    char *mine = slot_of(s, s->rank, s->round++);
    for (int d = 0; d < s->world; d++)
        if (counts[d] > k) {
            size_t m = counts[d] - k < per ? counts[d] - k : per;
            copy_in(mine + (size_t)d * per * isz, src + (displ[d] + k) * isz, m * isz);
        }
    announce(s);
}

static int finish_scatter_round(Segment *s, char *dst, const size_t *counts, size_t k, size_t per,
                                int kind, Failure *f) {
    size_t isz = kind_size[kind];
    uint64_t round = s->round - 1;
    int me = s->rank;
    const void *parts[MAXW];
    if (await_peers(s, f)) return -1;
    if (counts[me] > k) {
        size_t m = counts[me] - k < per ? counts[me] - k : per;
        for (int r = 0; r < s->world; r++) parts[r] = slot_of(s, r, round) + (size_t)me * per * isz;
        sum_of[kind](dst + k * isz, NULL, parts, s->world, m);
    }
    return 0;
}

/* Whether a reduce_scatter of these counts runs one round of the slots (not direct reads). */
static int fits_scatter(Segment *s, const size_t *counts, int kind) {
    size_t displ[MAXW], most, total = offsets(counts, s->world, displ, &most);
    return total > 0 && most <= scatter_part(s, kind) &&
           (s->world == 1 || total * kind_size[kind] < (size_t)s->direct_from);
}

/* Rank r sums, over all ranks, elements [displ[r], +counts[r]) of src (kind) into dst. */
static int do_reduce_scatter(Segment *s, const char *src, char *dst, const size_t *counts, int kind,
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
static int do_gatherv(Segment *s, const char *src, char *dst, const size_t *counts, int root,
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
static int do_broadcast(Segment *s, char *buf, size_t nbytes, int root, Failure *f) {
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


/* ------------------------------------------------------------------ Python glue */

static PyObject *raise_failure(Failure *f) {
    if (strcmp(f->what, "interrupted") == 0) return NULL; /* the signal handler's exception */
    PyObject *ranks = PyTuple_New(f->count);
    if (!ranks) return NULL;
    for (int i = 0; i < f->count; i++) PyTuple_SET_ITEM(ranks, i, PyLong_FromLong(f->ranks[i]));
    PyObject *args = Py_BuildValue("(sNd)", f->what, ranks, f->seconds);
    if (args) {
        PyErr_SetObject(WaitError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static int usable(Segment *s) {
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "a collective was called on this group while another one was allocating "
                        "its result (from a finalizer?): one call at a time (docs/contract.md)");
        return 0;
    }
    if (s->base == NULL || s->broken) {
        PyObject *args = Py_BuildValue("(s()d)", s->base == NULL ? "closed" : "broken", 0.0);
        if (args) {
            PyErr_SetObject(WaitError, args);
            Py_DECREF(args);
        }
        return 0;
    }
    return 1;
}

/* RC = CALL, without the GIL from gil_free_from bytes; below, with it (released by a long wait).
   The released thread state is kept in the segment, where a wait takes it back to run signal
   handlers (interrupted). */
#define CALL_GIL(S, BYTES, RC, CALL)                                                            \
    do {                                                                                        \
        (S)->holds_gil = (BYTES) < (size_t)(S)->gil_free_from;                                  \
        (S)->released = (S)->holds_gil ? NULL : PyEval_SaveThread();                            \
        RC = (CALL);                                                                            \
        (S)->holds_gil = 0;                                                                     \
        if ((S)->released) PyEval_RestoreThread((S)->released);                                 \
        (S)->released = NULL;                                                                   \
    } while (0)

#define RUN(S, BYTES, CALL)                                                                     \
    do {                                                                                        \
        Failure fail_;                                                                          \
        Failure *f = &fail_;                                                                    \
        int rc_;                                                                                \
        CALL_GIL(S, BYTES, rc_, CALL);                                                          \
        if (rc_) return raise_failure(f);                                                       \
        Py_RETURN_NONE;                                                                         \
    } while (0)

static int get_sizes(PyObject *seq, size_t *out, int w) {
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) != w) {
        PyErr_SetString(PyExc_ValueError, "counts: a tuple with one entry per rank");
        return -1;
    }
    for (int r = 0; r < w; r++) {
        out[r] = PyLong_AsSize_t(PyTuple_GET_ITEM(seq, r));
        if (out[r] == (size_t)-1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

#define ARGS(N)                                                                                 \
    if (nargs != (N)) {                                                                         \
        PyErr_Format(PyExc_TypeError, "expected %d arguments", (N));                            \
        return NULL;                                                                            \
    }                                                                                           \
    if (!usable(s)) return NULL

static int kind_ok(long kind) {
    if (kind < KIND_BOOL || kind > KIND_F16) {
        PyErr_Format(PyExc_ValueError, "unknown kind %ld", kind);
        return 0;
    }
    return 1;
}

/* all_reduce(src, dst, n, kind) */
static PyObject *seg_all_reduce(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(4);
    char *src = PyLong_AsVoidPtr(a[0]), *dst = PyLong_AsVoidPtr(a[1]);
    size_t n = PyLong_AsSize_t(a[2]);
    long kind = PyLong_AsLong(a[3]);
    if (PyErr_Occurred() || !kind_ok(kind)) return NULL;
    RUN(s, n * kind_size[kind], do_all_reduce(s, src, dst, n, (int)kind, f));
}

/* ------------------------------------------------------------------ the hot paths */

/* Attribute and method names the hot paths read (interned at import). */
static PyObject *S_dtype, *S_layout, *S_is_nested, *S_is_cpu, *S_is_neg, *S_is_contiguous, *S_numel,
    *S_data_ptr, *S_shape, *S_is_conj;

/* hot_config(tensor_type, kinds, sizes, strided, empty_like, new_empty, empty_large, large_from) */
static PyObject *seg_hot_config(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs != 8 || !PyType_Check(a[0]) || !PyDict_Check(a[1]) || !PyDict_Check(a[2])) {
        PyErr_SetString(PyExc_TypeError, "hot_config(tensor_type, kinds: dict, sizes: dict, strided, "
                                         "empty_like, new_empty, empty_large, large_from)");
        return NULL;
    }
    Py_ssize_t large_from = PyLong_AsSsize_t(a[7]);
    if (large_from == -1 && PyErr_Occurred()) return NULL;
    PyObject **slots[] = {&s->hot_type,  &s->hot_kinds, &s->hot_sizes,      &s->hot_strided,
                          &s->hot_empty, &s->hot_new,   &s->hot_empty_large};
    for (int i = 0; i < 7; i++) {
        Py_INCREF(a[i]);
        Py_XSETREF(*slots[i], a[i]);
    }
    s->hot_large_from = large_from;
    Py_RETURN_NONE;
}

/* 1 when x.<name> (a method call when call) is `want`, 0 when not, -1 on an error. */
static int reads(PyObject *x, PyObject *name, int call, PyObject *want) {
    PyObject *v = call ? PyObject_CallMethodNoArgs(x, name) : PyObject_GetAttr(x, name);
    if (!v) return -1;
    int same = v == want;
    Py_DECREF(v);
    return same;
}

/* x.<name>() as an integer or address; -1 with an exception on an error. */
static int read_int(PyObject *x, PyObject *name, int address, uintptr_t *out) {
    PyObject *v = PyObject_CallMethodNoArgs(x, name);
    if (!v) return -1;
    *out = address ? (uintptr_t)PyLong_AsVoidPtr(v) : (uintptr_t)PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return PyErr_Occurred() ? -1 : 0;
}

/* Whether a hot path may run now: configured, mapped, not broken, not inside another call. */
static int hot_ready(Segment *s) { return s->hot_type && s->base && !s->broken && !s->busy; }

/* Whether x is a plain host tensor: an exact torch.Tensor, strided, not nested, on the CPU, with
   no lazy negation, contiguous. Errors are cleared (the caller's general path reports them). */
static int plain_tensor(Segment *s, PyObject *x) {
    int ok = (PyObject *)Py_TYPE(x) == s->hot_type && reads(x, S_layout, 0, s->hot_strided) == 1 &&
             reads(x, S_is_nested, 0, Py_False) == 1 && reads(x, S_is_cpu, 0, Py_True) == 1 &&
             reads(x, S_is_neg, 1, Py_False) == 1 && reads(x, S_is_contiguous, 1, Py_True) == 1;
    if (PyErr_Occurred()) PyErr_Clear();
    return ok;
}

/* The kind of x when sum_fresh takes it (a plain tensor of a dtype in hot_kinds); 0 when not. */
static long hot_kind(Segment *s, PyObject *x) {
    if ((PyObject *)Py_TYPE(x) != s->hot_type) return 0;
    PyObject *dtype = PyObject_GetAttr(x, S_dtype);
    if (!dtype) {
        PyErr_Clear();
        return 0;
    }
    PyObject *k = PyDict_GetItemWithError(s->hot_kinds, dtype); /* borrowed */
    Py_DECREF(dtype);
    long kind = k ? PyLong_AsLong(k) : 0;
    if (PyErr_Occurred()) PyErr_Clear();
    return kind >= KIND_BOOL && kind <= KIND_F16 && plain_tensor(s, x) ? kind : 0;
}

/* After a failed allocation between a post and its finish: wait for the peers all the same (they
   read this rank's slot and stay in step), keeping the allocation's error for the caller. */
static void finish_after_error(Segment *s) {
    PyObject *type, *value, *tb;
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    PyErr_Fetch(&type, &value, &tb);
    CALL_GIL(s, 0, rc, await_peers(s, f));
    /* a failed wait has marked the segment broken: the next call reports it; a signal handler's
       exception replaces the allocation's */
    if (rc && strcmp(f->what, "interrupted") == 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return;
    }
    PyErr_Restore(type, value, tb);
}

/* A hot path's result: fn(x), or fn(x, shape) when shape is given, with the segment marked busy
   while this rank's post waits on it (posted). NULL after an error, having finished the post's
   wait so the ranks stay in step. *dst: the result's address. */
static PyObject *allocate(Segment *s, PyObject *fn, PyObject *x, PyObject *shape, int posted,
                          uintptr_t *dst) {
    PyObject *args[] = {x, shape};
    s->busy = posted;
    PyObject *out = PyObject_Vectorcall(fn, args, shape ? 2 : 1, NULL);
    s->busy = 0;
    if (out && read_int(out, S_data_ptr, 1, dst)) Py_CLEAR(out);
    if (!out && posted) finish_after_error(s);
    return out;
}

/* out, or NULL with the wait's WaitError (out released) when the wait failed. */
static PyObject *result_of(PyObject *out, int rc, Failure *f) {
    if (!rc) return out;
    Py_DECREF(out);
    return raise_failure(f);
}

/* sum_fresh(x): the rank-order sum of every rank's x in a fresh tensor (docs/shm.md, "Per call"),
   or None, having done nothing, for a tensor the hot path does not take (the caller then checks x
   and takes the general path). A one-shot sum publishes x before allocating the result, so the
   allocation overlaps the wait for the peers. */
static PyObject *seg_sum_fresh(Segment *s, PyObject *x) {
    long kind = hot_ready(s) ? hot_kind(s, x) : 0;
    uintptr_t n, src, dst;
    if (!kind || read_int(x, S_numel, 0, &n) || read_int(x, S_data_ptr, 1, &src)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    size_t total = n * kind_size[kind];
    int large = total >= (size_t)s->hot_large_from;
    int posted = !large && fits_one_shot(s, total, (int)kind);
    if (posted) {
        size_t count = n;
        begin(s, describe(OP_SUM, kind, &count, 1));
        post_one_shot(s, (const char *)src, total);
    }
    PyObject *out = allocate(s, large ? s->hot_empty_large : s->hot_empty, x, NULL, posted, &dst);
    if (!out) return NULL;
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    if (posted)
        CALL_GIL(s, total, rc, finish_one_shot(s, (const char *)src, (char *)dst, n, (int)kind, f));
    else
        CALL_GIL(s, total, rc, do_all_reduce(s, (const char *)src, (char *)dst, n, (int)kind, f));
    return result_of(out, rc, f);
}

/* The product of shape[:at] into *before, and of shape[at:] returned; a failed conversion leaves
   an exception set (the caller checks PyErr_Occurred). */
static size_t split_shape(PyObject *shape, Py_ssize_t nd, Py_ssize_t at, size_t *before) {
    size_t after = 1;
    *before = 1;
    for (Py_ssize_t i = 0; i < nd; i++) {
        size_t d = PyLong_AsSize_t(PyTuple_GET_ITEM(shape, i));
        if (i < at) *before *= d;
        else after *= d;
    }
    return after;
}

/* shape with entry `at` replaced by `size` (a new tuple), or NULL with an exception. */
static PyObject *reshaped(PyObject *shape, Py_ssize_t nd, Py_ssize_t at, size_t size) {
    PyObject *out = PyTuple_New(nd);
    for (Py_ssize_t i = 0; out && i < nd; i++)
        PyTuple_SET_ITEM(out, i, i == at ? PyLong_FromSize_t(size) : Py_NewRef(PyTuple_GET_ITEM(shape, i)));
    return out;
}

/* The element size of x's dtype when the gathers' hot paths move it (hot_sizes); 0 when not. */
static size_t gathered_itemsize(Segment *s, PyObject *x) {
    PyObject *dtype = PyObject_GetAttr(x, S_dtype);
    PyObject *size = dtype ? PyDict_GetItemWithError(s->hot_sizes, dtype) : NULL; /* borrowed */
    Py_XDECREF(dtype);
    size_t isz = size ? PyLong_AsSize_t(size) : 0;
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return isz;
}

/* The common end of the gathers' hot paths: post this rank's block (counts[me] bytes at src),
   allocate the result (hot_new(x, shape); shape is a new reference, released here), and finish
   the gather into it (finish_gather's rows and stride). */
static PyObject *gather_posted(Segment *s, PyObject *x, uintptr_t src, PyObject *shape,
                               const size_t *counts, size_t rows, size_t stride) {
    size_t displ[MAXW], most, total = offsets(counts, s->world, displ, &most);
    uintptr_t dst;
    begin(s, describe(OP_GATHER, -1, counts, s->world));
    post_one_shot(s, (const char *)src, counts[s->rank]);
    PyObject *out = allocate(s, s->hot_new, x, shape, 1, &dst);
    Py_DECREF(shape);
    if (!out) return NULL;
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    CALL_GIL(s, total, rc, finish_gather(s, (const char *)src, (char *)dst, counts, rows, stride, f));
    return result_of(out, rc, f);
}

/* gather_fresh(x, dim): torch.cat of every rank's x along dim (an int, negative from the end) in a
   fresh tensor, or None, having done nothing, for what this hot path does not take: anything but
   a plain tensor of a dtype in hot_sizes, of at least one dimension, with no lazy conjugation,
   a dim out of range, an empty tensor, or a gather that does not fit one round of the slots.
   Publishes x before allocating the result (hot_new(x, shape): x.new_empty), and writes the
   blocks straight to their places along dim. */
static PyObject *seg_gather_fresh(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs != 2 || !PyLong_CheckExact(a[1]) || !hot_ready(s) || !plain_tensor(s, a[0]))
        Py_RETURN_NONE;
    PyObject *x = a[0], *shape = PyObject_GetAttr(x, S_shape), *bigger = NULL;
    size_t isz = gathered_itemsize(s, x);
    uintptr_t src;
    long dim = PyLong_AsLong(a[1]);
    Py_ssize_t nd = shape && PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : 0;
    if (dim < 0) dim += nd;
    if (PyErr_Occurred() || !isz || nd == 0 || dim < 0 || dim >= nd ||
        reads(x, S_is_conj, 1, Py_False) != 1 ||
        read_int(x, S_data_ptr, 1, &src)) {
        PyErr_Clear();
        Py_XDECREF(shape);
        Py_RETURN_NONE;
    }
    size_t rows, row_bytes = isz * split_shape(shape, nd, dim, &rows), nbytes = rows * row_bytes;
    size_t along = PyLong_AsSize_t(PyTuple_GET_ITEM(shape, dim)), counts[MAXW];
    for (int r = 0; r < s->world; r++) counts[r] = nbytes;
    if (PyErr_Occurred() || !fits_gather(s, counts) ||
        nbytes * (size_t)s->world >= (size_t)s->hot_large_from ||
        !(bigger = reshaped(shape, nd, dim, along * (size_t)s->world))) {
        PyErr_Clear();
        Py_DECREF(shape);
        Py_RETURN_NONE;
    }
    Py_DECREF(shape);
    return gather_posted(s, x, src, bigger, counts, rows, row_bytes * (size_t)s->world);
}

/* `sizes` as one non-negative int per rank (a list or tuple of exact ints) into out; returns
   their sum, or -1 when it is not that (no exception set: the general path reports it). */
static Py_ssize_t read_sizes(Segment *s, PyObject *sizes, size_t *out) {
    int w = s->world;
    if (!(PyList_CheckExact(sizes) || PyTuple_CheckExact(sizes)) || PySequence_Fast_GET_SIZE(sizes) != w)
        return -1;
    size_t sum = 0;
    for (int r = 0; r < w; r++) {
        PyObject *v = PySequence_Fast_GET_ITEM(sizes, r);
        out[r] = PyLong_CheckExact(v) ? PyLong_AsSize_t(v) : (size_t)-1; /* negative: fails */
        if (out[r] == (size_t)-1) {
            PyErr_Clear();
            return -1;
        }
        sum += out[r];
    }
    return (Py_ssize_t)sum;
}

/* gatherv_fresh(x, dim, sizes): all_gatherv along dim 0: rank 0's rows, then rank 1's, ... in a
   fresh tensor (sizes[r] rows from rank r; None: every rank has x's rows), or None, having done
   nothing, for what this hot path does not take: anything but a plain tensor of a dtype in
   hot_sizes, of at least one dimension, with no lazy conjugation, dim other than 0 (or -ndim),
   sizes whose entry for this rank is not x's rows, or a gather that does not fit one round of
   the slots. Publishes x before allocating the result (hot_new(x, shape)). */
static PyObject *seg_gatherv_fresh(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs != 3 || !PyLong_CheckExact(a[1]) || !hot_ready(s) || !plain_tensor(s, a[0]))
        Py_RETURN_NONE;
    PyObject *x = a[0], *shape = PyObject_GetAttr(x, S_shape), *bigger = NULL;
    Py_ssize_t nd = shape && PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : 0;
    long dim = PyLong_AsLong(a[1]);
    size_t isz = gathered_itemsize(s, x), rows, row = isz * split_shape(shape, nd, 1, &rows);
    size_t sizes[MAXW], counts[MAXW];
    uintptr_t src;
    int me = s->rank, w = s->world;
    Py_ssize_t total_rows = -1;
    if (!PyErr_Occurred() && isz && nd > 0 && (dim == 0 || dim == -nd)) {
        if (a[2] == Py_None) {
            for (int r = 0; r < w; r++) sizes[r] = rows;
            total_rows = (Py_ssize_t)(rows * (size_t)w);
        } else {
            total_rows = read_sizes(s, a[2], sizes);
        }
    }
    if (total_rows < 0 || sizes[me] != rows || reads(x, S_is_conj, 1, Py_False) != 1 ||
        read_int(x, S_data_ptr, 1, &src)) {
        PyErr_Clear();
        Py_XDECREF(shape);
        Py_RETURN_NONE;
    }
    for (int r = 0; r < w; r++) counts[r] = sizes[r] * row;
    if (!fits_gather(s, counts) || (size_t)total_rows * row >= (size_t)s->hot_large_from ||
        !(bigger = reshaped(shape, nd, 0, (size_t)total_rows))) {
        PyErr_Clear();
        Py_DECREF(shape);
        Py_RETURN_NONE;
    }
    Py_DECREF(shape);
    return gather_posted(s, x, src, bigger, counts, 1, 0);
}

/* Rows per rank of a reduce_scatter along dim 0 of `rows` rows: `sizes` (None: an even split,
   which must divide; else read_sizes summing to rows). 0, or -1 when the hot path does not take
   it (no exception set). */
static int split_rows(Segment *s, PyObject *sizes, size_t rows, size_t *out) {
    int w = s->world;
    if (sizes == Py_None) {
        if (rows % (size_t)w) return -1;
        for (int r = 0; r < w; r++) out[r] = rows / (size_t)w;
        return 0;
    }
    return read_sizes(s, sizes, out) == (Py_ssize_t)rows ? 0 : -1;
}

/* scatter_fresh(x, dim, sizes): reduce_scatter(v) along dim 0: this rank's rows of the sum over
   ranks of x (rows [sum(sizes[:r]), +sizes[r]) for rank r; sizes None: an even split) in a
   fresh tensor, or None, having done nothing, for what this hot path does not take: anything
   but a plain tensor of a dtype summed here with at least one dimension, dim other than 0 (or
   -ndim), sizes that do not split the rows, or a reduce_scatter that does not fit one round of
   the slots. Publishes x before allocating the result (hot_new(x, shape)). */
static PyObject *seg_scatter_fresh(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    long kind = nargs == 3 && PyLong_CheckExact(a[1]) && hot_ready(s) ? hot_kind(s, a[0]) : 0;
    if (!kind) Py_RETURN_NONE;
    PyObject *x = a[0], *shape = PyObject_GetAttr(x, S_shape), *smaller = NULL, *out = NULL;
    Py_ssize_t nd = shape && PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : 0;
    long dim = PyLong_AsLong(a[1]);
    size_t rows_of[MAXW], counts[MAXW], rows, inner = split_shape(shape, nd, 1, &rows);
    uintptr_t src, dst;
    int me = s->rank, w = s->world;
    if (PyErr_Occurred() || nd == 0 || (dim != 0 && dim != -nd) ||
        split_rows(s, a[2], rows, rows_of) || read_int(x, S_data_ptr, 1, &src)) {
        PyErr_Clear();
        Py_XDECREF(shape);
        Py_RETURN_NONE;
    }
    for (int r = 0; r < w; r++) counts[r] = rows_of[r] * inner;
    if (!fits_scatter(s, counts, (int)kind) ||
        counts[me] * kind_size[kind] >= (size_t)s->hot_large_from ||
        !(smaller = reshaped(shape, nd, 0, rows_of[me]))) {
        PyErr_Clear();
        Py_DECREF(shape);
        Py_RETURN_NONE;
    }
    Py_DECREF(shape);
    size_t displ[MAXW], most, per = scatter_part(s, (int)kind);
    offsets(counts, w, displ, &most);
    begin(s, describe(OP_SCATTER, kind, counts, w));
    post_scatter_round(s, (const char *)src, counts, displ, 0, per, kind_size[kind]);
    out = allocate(s, s->hot_new, x, smaller, 1, &dst);
    Py_DECREF(smaller);
    if (!out) return NULL;
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    CALL_GIL(s, counts[me] * kind_size[kind] * (size_t)w, rc,
             finish_scatter_round(s, (char *)dst, counts, 0, per, (int)kind, f));
    return result_of(out, rc, f);
}

/* reduce_scatter(src, dst, counts, kind): counts in elements, one per rank */
static PyObject *seg_reduce_scatter(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(4);
    size_t counts[MAXW];
    char *src = PyLong_AsVoidPtr(a[0]), *dst = PyLong_AsVoidPtr(a[1]);
    long kind = PyLong_AsLong(a[3]);
    if (PyErr_Occurred() || !kind_ok(kind) || get_sizes(a[2], counts, s->world)) return NULL;
    RUN(s, counts[s->rank] * kind_size[kind] * (size_t)s->world,
        do_reduce_scatter(s, src, dst, counts, (int)kind, f));
}

/* all_gather(src, dst, nbytes): W blocks of nbytes into dst, in rank order */
static PyObject *seg_all_gather(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(3);
    size_t counts[MAXW];
    char *src = PyLong_AsVoidPtr(a[0]), *dst = PyLong_AsVoidPtr(a[1]);
    size_t n = PyLong_AsSize_t(a[2]);
    if (PyErr_Occurred()) return NULL;
    for (int r = 0; r < s->world; r++) counts[r] = n;
    RUN(s, n * (size_t)s->world, do_gatherv(s, src, dst, counts, -1, f));
}

/* gatherv(src, dst, counts, root): counts in bytes; root -1: every rank receives */
static PyObject *seg_gatherv(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(4);
    size_t counts[MAXW], total = 0;
    char *src = PyLong_AsVoidPtr(a[0]), *dst = PyLong_AsVoidPtr(a[1]);
    long root = PyLong_AsLong(a[3]);
    if (PyErr_Occurred() || get_sizes(a[2], counts, s->world)) return NULL;
    for (int r = 0; r < s->world; r++) total += counts[r];
    RUN(s, total, do_gatherv(s, src, dst, counts, (int)root, f));
}

/* broadcast(buf, nbytes, root): in place */
static PyObject *seg_broadcast(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(3);
    char *buf = PyLong_AsVoidPtr(a[0]);
    size_t n = PyLong_AsSize_t(a[1]);
    long root = PyLong_AsLong(a[2]);
    if (PyErr_Occurred()) return NULL;
    RUN(s, n, do_broadcast(s, buf, n, (int)root, f));
}

/* barrier(): one round with no data */
static PyObject *seg_barrier(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(0);
    (void)a;
    begin(s, describe(OP_BARRIER, 0, NULL, 0));
    RUN(s, 0, step(s, f));
}

/* probe_direct(): whether this rank reads every peer's memory directly (collective; one wait) */
static PyObject *seg_probe_direct(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(0);
    (void)a;
    Failure fail_;
    int ok;
    CALL_GIL(s, (size_t)-1, ok, probe_direct(s, &fail_));
    if (ok < 0) return raise_failure(&fail_);
    return PyBool_FromLong(ok);
}

/* start(): read the peers' pids (after every rank has mapped and written its own) */
static PyObject *seg_start(Segment *s, PyObject *unused) {
    (void)unused;
    for (int r = 0; r < s->world; r++) s->pids[r] = __atomic_load_n(pid_of(s, r), __ATOMIC_ACQUIRE);
    Py_RETURN_NONE;
}

/* close_fd(): drop the creator's descriptor (once every rank has mapped the segment) */
static PyObject *seg_close_fd(Segment *s, PyObject *unused) {
    (void)unused;
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    Py_RETURN_NONE;
}

static PyObject *seg_close(Segment *s, PyObject *unused) {
    (void)unused;
    if (s->busy) { /* from a signal handler or finalizer inside a call: unmapped at dealloc */
        s->broken = 1;
        Py_RETURN_NONE;
    }
    if (s->base) munmap(s->base, s->length);
    s->base = NULL;
    return seg_close_fd(s, NULL);
}

static PyObject *seg_pids(Segment *s, PyObject *unused) {
    (void)unused;
    PyObject *t = PyTuple_New(s->world);
    for (int r = 0; t && r < s->world; r++) PyTuple_SET_ITEM(t, r, PyLong_FromLong(s->pids[r]));
    return t;
}

static void seg_dealloc(Segment *s) {
    if (s->base) munmap(s->base, s->length);
    Py_CLEAR(s->hot_type);
    Py_CLEAR(s->hot_kinds);
    Py_CLEAR(s->hot_sizes);
    Py_CLEAR(s->hot_strided);
    Py_CLEAR(s->hot_empty);
    Py_CLEAR(s->hot_new);
    Py_CLEAR(s->hot_empty_large);
    free(s->scratch);
    if (s->fd >= 0) close(s->fd);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* Segment(name, world, rank, slot_bytes, create): when create, make the shared memory object
   `name` (exclusively: a name in use raises FileExistsError) and remove the name at once, so
   nothing is left in /dev/shm whatever happens to any rank from here on (the memory lives while
   a mapping or descriptor does); reserve its memory (posix_fallocate: a full /dev/shm is an
   OSError here, never a SIGBUS at a later write) and keep the descriptor (fd) until close_fd(),
   for the peers to open as /proc/<pid>/fd/<fd>. Else `name` is that path. Then map it. */
static int seg_init(Segment *s, PyObject *args, PyObject *kw) {
    const char *name;
    int world, rank, create;
    Py_ssize_t slot;
    s->fd = -1; /* before any failure: dealloc closes it */
    if (!PyArg_ParseTuple(args, "siinp", &name, &world, &rank, &slot, &create)) return -1;
    if (world < 1 || world > MAXW || rank < 0 || rank >= world || slot < ALIGN || slot % ALIGN) {
        PyErr_SetString(PyExc_ValueError, "Segment: bad world, rank or slot size");
        return -1;
    }
    size_t ctrl = ((size_t)world * CTRL + 4095) / 4096 * 4096;
    size_t length = ctrl + (size_t)world * 2 * (size_t)slot;
    int fd = create ? shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600) : open(name, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
        return -1;
    }
    if (create) {
        shm_unlink(name);
        int err = ftruncate(fd, (off_t)length) != 0 ? errno : 0;
        while (!err && (err = posix_fallocate(fd, 0, (off_t)length)) == EINTR) {
        }
        if (err) {
            char where[300];
            snprintf(where, sizeof where, "/dev/shm%s (%zu bytes)", name, length);
            errno = err;
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, where);
            close(fd);
            return -1;
        }
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size != length) {
        close(fd);
        PyErr_Format(PyExc_OSError, "%s: size %ld, expected %zu", name, (long)st.st_size, length);
        return -1;
    }
    void *base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
        close(fd);
        return -1;
    }
    if (create)
        s->fd = fd;
    else
        close(fd);
    s->base = base;
    s->length = length;
    s->data = (char *)base + ctrl;
    s->slot = (size_t)slot;
    s->world = world;
    s->rank = rank;
    s->stage = 0;
    s->round = 0;
    s->timeout = 0;
    s->oneshot_max = 1 << 20;
    s->oneshot_narrow_max = 1 << 20;
    s->broken = 0;
    s->gil_free_from = 0;
    s->direct_from = PY_SSIZE_T_MAX;
    s->probe = PROBE;
    s->scratch = malloc((size_t)world * CHUNK);
    if (!s->scratch) {
        munmap(base, length);
        s->base = NULL;
        PyErr_NoMemory();
        return -1;
    }
    memset(s->pids, 0, sizeof s->pids);
    *probe_of(s, rank) = (uint64_t)(uintptr_t)&s->probe;
    __atomic_store_n(pid_of(s, rank), (int)getpid(), __ATOMIC_RELEASE);
    return 0;
}

static PyObject *core_unlink(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (shm_unlink(name) != 0 && errno != ENOENT) return PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
    Py_RETURN_NONE;
}

/* sum(dst, srcs: tuple of addresses, n, kind): dst = rank-order sum (for tests and benchmarks) */
static PyObject *core_sum(PyObject *self, PyObject *const *a, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4 || !PyTuple_Check(a[1])) {
        PyErr_SetString(PyExc_TypeError, "sum(dst, srcs, n, kind)");
        return NULL;
    }
    const void *parts[MAXW];
    Py_ssize_t w = PyTuple_GET_SIZE(a[1]);
    if (w < 1 || w > MAXW) {
        PyErr_SetString(PyExc_ValueError, "sum: 1 to 64 sources");
        return NULL;
    }
    for (Py_ssize_t r = 0; r < w; r++) parts[r] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(a[1], r));
    void *dst = PyLong_AsVoidPtr(a[0]);
    size_t n = PyLong_AsSize_t(a[2]);
    long kind = PyLong_AsLong(a[3]);
    if (PyErr_Occurred() || !kind_ok(kind)) return NULL;
    sum_of[kind](dst, NULL, parts, (int)w, n);
    Py_RETURN_NONE;
}

static PyMethodDef seg_methods[] = {
    {"all_reduce", (PyCFunction)(void (*)(void))seg_all_reduce, METH_FASTCALL, "all_reduce(src, dst, n, kind)"},
    {"sum_fresh", (PyCFunction)seg_sum_fresh, METH_O, "sum_fresh(x): the sum of every rank's tensor x, fresh, or None"},
    {"gather_fresh", (PyCFunction)(void (*)(void))seg_gather_fresh, METH_FASTCALL,
     "gather_fresh(x, dim): torch.cat of every rank's x along dim, fresh, or None"},
    {"gatherv_fresh", (PyCFunction)(void (*)(void))seg_gatherv_fresh, METH_FASTCALL,
     "gatherv_fresh(x, dim, sizes): every rank's rows of x along dim 0, fresh, or None"},
    {"scatter_fresh", (PyCFunction)(void (*)(void))seg_scatter_fresh, METH_FASTCALL,
     "scatter_fresh(x, dim, sizes): this rank's rows of the sum of every rank's x, fresh, or None"},
    {"hot_config", (PyCFunction)(void (*)(void))seg_hot_config, METH_FASTCALL,
     "hot_config(tensor_type, kinds, sizes, strided, empty_like, new_empty, empty_large, large_from): what "
     "the hot paths take"},
    {"reduce_scatter", (PyCFunction)(void (*)(void))seg_reduce_scatter, METH_FASTCALL, "reduce_scatter(src, dst, counts, kind)"},
    {"all_gather", (PyCFunction)(void (*)(void))seg_all_gather, METH_FASTCALL, "all_gather(src, dst, nbytes)"},
    {"gatherv", (PyCFunction)(void (*)(void))seg_gatherv, METH_FASTCALL, "gatherv(src, dst, counts, root)"},
    {"broadcast", (PyCFunction)(void (*)(void))seg_broadcast, METH_FASTCALL, "broadcast(buf, nbytes, root)"},
    {"barrier", (PyCFunction)(void (*)(void))seg_barrier, METH_FASTCALL, "barrier()"},
    {"probe_direct", (PyCFunction)(void (*)(void))seg_probe_direct, METH_FASTCALL, "probe_direct(): whether peers' memory reads directly"},
    {"start", (PyCFunction)seg_start, METH_NOARGS, "read the peers' pids"},
    {"close", (PyCFunction)seg_close, METH_NOARGS, "unmap"},
    {"pids", (PyCFunction)seg_pids, METH_NOARGS, "the ranks' pids"},
    {"close_fd", (PyCFunction)seg_close_fd, METH_NOARGS, "drop the creator's descriptor"},
    {NULL, NULL, 0, NULL}};

#include <structmember.h>
static PyMemberDef seg_members[] = {
    {"timeout", T_DOUBLE, offsetof(Segment, timeout), 0, "seconds a wait may last (<= 0: no bound)"},
    {"oneshot_max", T_PYSSIZET, offsetof(Segment, oneshot_max), 0, "all_reduce bytes summed one-shot"},
    {"oneshot_narrow_max", T_PYSSIZET, offsetof(Segment, oneshot_narrow_max), 0, "the same for bf16/fp16"},
    {"direct_from", T_PYSSIZET, offsetof(Segment, direct_from), 0, "bytes from which peers' tensors are read directly"},
    {"gil_free_from", T_INT, offsetof(Segment, gil_free_from), 0, "bytes from which the GIL is released"},
    {"broken", T_INT, offsetof(Segment, broken), 0, "1 after a failed wait"},
    {"slot", T_PYSSIZET, offsetof(Segment, slot), READONLY, "bytes per slot"},
    {"world", T_INT, offsetof(Segment, world), READONLY, "ranks"},
    {"rank", T_INT, offsetof(Segment, rank), READONLY, "this rank"},
    {"fd", T_INT, offsetof(Segment, fd), READONLY, "the creator's descriptor (-1: none)"},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject SegmentType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpicomm.shm._core.Segment",
    .tp_basicsize = sizeof(Segment),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Segment(name, world, rank, slot_bytes, create): one group's shared memory",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)seg_init,
    .tp_dealloc = (destructor)seg_dealloc,
    .tp_methods = seg_methods,
    .tp_members = seg_members,
};

static PyMethodDef core_methods[] = {
    {"unlink", core_unlink, METH_O, "unlink(name): remove a shared memory name"},
    {"sum", (PyCFunction)(void (*)(void))core_sum, METH_FASTCALL, "sum(dst, srcs, n, kind)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core", NULL, -1, core_methods};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&SegmentType) < 0) return NULL;
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *thread = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = thread ? PyObject_GetAttrString(thread, "ident") : NULL;
    Py_XDECREF(threading);
    Py_XDECREF(thread);
    if (!ident) return NULL;
    main_thread = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (PyErr_Occurred()) return NULL;
#if defined(__x86_64__)
    unsigned eax, ebx, ecx, edx;
    fast_strings = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ebx & (1u << 9)); /* ERMS */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
        sum_of[KIND_BF16] = sum_bf16_512;
        sum_of[KIND_F16] = sum_f16_512;
        sum_of[KIND_F32] = sum_f32_512;
    }
#endif
    const char *names[] = {"dtype", "layout", "is_nested", "is_cpu", "is_neg", "is_contiguous", "numel",
                           "data_ptr", "shape", "is_conj"};
    PyObject **interned[] = {&S_dtype, &S_layout, &S_is_nested, &S_is_cpu, &S_is_neg, &S_is_contiguous,
                             &S_numel, &S_data_ptr, &S_shape, &S_is_conj};
    for (int i = 0; i < 10; i++)
        if (!(*interned[i] = PyUnicode_InternFromString(names[i]))) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    WaitError = PyErr_NewException("mpicomm.shm._core.WaitError", PyExc_RuntimeError, NULL);
    Py_INCREF(&SegmentType);
    PyModule_AddObject(m, "Segment", (PyObject *)&SegmentType);
    PyModule_AddObject(m, "WaitError", WaitError);
    PyModule_AddIntConstant(m, "CTRL", CTRL);
    PyModule_AddIntConstant(m, "MAXW", MAXW);
    return m;
}
