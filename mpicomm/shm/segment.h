/* mpicomm.shm._core, the segment protocol (segment.c): one Segment per communicator whose ranks
   share a node (docs/shm.md). Layout of the POSIX shared-memory mapping, for W ranks and slot
   size S:

       [control: W lines of CTRL bytes]  rank r's line: its stage, pid, call headers, addresses
       [data: W x 2 slots of S bytes]     slot (r, b): rank r's buffer b (double buffering)

   Every collective is a sequence of rounds. In a round each rank writes into its own slot of
   buffer (round % 2), publishes stage + 1 (a release store), waits until every peer has
   published it too (acquire loads; spin, yield, then sleep), then reads peers' slots. A rank
   writes buffer b again only two rounds later, after every peer has published the round between,
   which it does only after finishing its reads of b: no extra synchronisation is needed. A
   collective's first stage carries a header its peers check before reading anything (begin).

   Large messages skip the slots where the kernel lets one process read another's memory
   (process_vm_readv, "direct"; probed once per segment): each rank publishes the addresses of its
   input and output in its control line, and peers copy straight out of them. One copy per byte
   instead of two (into a slot, out of it), and three waits per call instead of two per slot.

   The collectives (do_*) run without the GIL when the binding (_core.c) releases it; a wait that
   grows long releases it itself and takes it back to run Python's signal handlers. */
#ifndef MPICOMM_SHM_SEGMENT_H
#define MPICOMM_SHM_SEGMENT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "sums.h"

#define CTRL 128 /* bytes per rank's control line (two cache lines: no false sharing) */
#define MAXW 64  /* the most ranks one segment serves */
#define ALIGN 64
#define CHUNK (128 << 10) /* bytes a direct sum reads from one peer at a time (stays in L2) */
#define PROBE 0x6d7069636f6d6d31ull /* the word peers read to test direct reads */

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

uint64_t describe(int op, long extra, const size_t *counts, int n);

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

/* Publish the next stage (a release store: what this rank wrote before is visible to a peer that
   sees the stage). */
static inline void announce(Segment *s) {
    __atomic_store_n(stage_of(s, s->rank), ++s->stage, __ATOMIC_RELEASE);
}

int await_peers(Segment *s, Failure *fail);
int step(Segment *s, Failure *fail);

extern unsigned long main_thread; /* Python runs signal handlers in this thread only */
extern int fast_strings;          /* the CPU has fast `rep movsb` (ERMS): find_fast_strings */
void find_fast_strings(void);

/* A rank's data into its own slot, whose lines its peers hold from reading the slot before.
   From MOVSB_FROM bytes on x86-64 with fast strings (ERMS), `rep movsb`, whose whole-line writes
   take the lines without fetching their old contents from the peers' caches, where glibc's
   vector copy of such sizes fetches them (measured: benchmarks/results/history/2026-12-03-shared-memory.md, fourth
   pass); from 3 KiB glibc uses it too. */
#define MOVSB_FROM 1024

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

static inline size_t align_down(size_t n, size_t unit) { return n / unit * unit; }

/* The largest all_reduce of kind that every rank sums whole (one-shot). */
static inline size_t one_shot_max(Segment *s, int kind) {
    return kind == KIND_BF16 || kind == KIND_F16 ? s->oneshot_narrow_max : s->oneshot_max;
}

/* The two halves of a one-shot all_reduce round (the hot path allocates its result between
   them, while the peers' data is on its way): post copies src into this rank's slot and
   publishes it; finish waits for the peers' and sums n elements into dst. A rank's own part of a
   sum comes from src, not from its slot copy (that copy is for its peers): one pass less. */
static inline void post_one_shot(Segment *s, const char *src, size_t total) {
    copy_in(slot_of(s, s->rank, s->round++), src, total);
    announce(s);
}

/* Whether an all_reduce of total bytes is one one-shot round (the hot path's split). */
static inline int fits_one_shot(Segment *s, size_t total, int kind) {
    return total > 0 && total <= one_shot_max(s, kind) && total <= s->slot &&
           (s->world == 1 || total < (size_t)s->direct_from);
}

/* displ[r] = counts[0] + ... + counts[r-1]; returns the total, and the largest count in *most. */
static inline size_t offsets(const size_t *counts, int w, size_t *displ, size_t *most) {
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
static inline int fits_gather(Segment *s, const size_t *counts) {
    size_t displ[MAXW], most, total = offsets(counts, s->world, displ, &most);
    return total > 0 && most <= s->slot && (s->world == 1 || total < (size_t)s->direct_from);
}

/* Elements of kind per destination's part of a slot in a reduce_scatter round. */
static inline size_t scatter_part(Segment *s, int kind) {
    return align_down(s->slot / (size_t)s->world, (size_t)ALIGN) / kind_size[kind];
}

/* Whether a reduce_scatter of these counts runs one round of the slots (not direct reads). */
static inline int fits_scatter(Segment *s, const size_t *counts, int kind) {
    size_t displ[MAXW], most, total = offsets(counts, s->world, displ, &most);
    return total > 0 && most <= scatter_part(s, kind) &&
           (s->world == 1 || total * kind_size[kind] < (size_t)s->direct_from);
}

int probe_direct(Segment *s, Failure *f);
int finish_one_shot(Segment *s, const char *src, char *dst, size_t n, int kind, Failure *f);
int do_all_reduce(Segment *s, const char *src, char *dst, size_t n, int kind, Failure *f);
int finish_gather(Segment *s, const char *src, char *dst, const size_t *counts, size_t rows,
                         size_t stride, Failure *f);
void post_scatter_round(Segment *s, const char *src, const size_t *counts, const size_t *displ,
                               size_t k, size_t per, size_t isz);
int finish_scatter_round(Segment *s, char *dst, const size_t *counts, size_t k, size_t per,
                                int kind, Failure *f);
int do_reduce_scatter(Segment *s, const char *src, char *dst, const size_t *counts, int kind,
                             Failure *f);
int do_gatherv(Segment *s, const char *src, char *dst, const size_t *counts, int root,
                      Failure *f);
int do_broadcast(Segment *s, char *buf, size_t nbytes, int root, Failure *f);

#endif
