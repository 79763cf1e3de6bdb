/* mpicomm.shm._core: the compiled hot loop of the intra-node shared-memory collectives, one
   extension module built from three files, one concern each (docs/shm.md):

       sums.c     element conversions as torch makes them and the rank-order sums (SIMD)
       segment.c  the segment protocol: control lines, rounds, waits, direct reads, collectives
       _core.c    this file, the Python binding: the Segment type, its methods and hot paths

   The Python side (transport.py) passes raw addresses, counts and a kind code (KIND_*, sums.h),
   and the hot paths read a tensor's attributes by name through Python's C API, so this module
   does not depend on torch's ABI. */
#include "segment.h" /* first: Python.h comes before the system headers */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>


static PyObject *WaitError; /* args: (what: "timeout" | "died" | "mismatch" | "broken", ranks: tuple,
                               seconds) */

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
    *S_data_ptr, *S_shape, *S_is_conj, *S_requires_grad;

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

/* sum_into(x): x <- the rank-order sum of every rank's x (torch.distributed's in-place
   all_reduce), returning x, or None, having done nothing, for what sum_fresh would not take or a
   tensor that requires grad (the caller then checks x and takes the general path). */
static PyObject *seg_sum_into(Segment *s, PyObject *x) {
    long kind = hot_ready(s) ? hot_kind(s, x) : 0;
    uintptr_t n, src;
    if (!kind || reads(x, S_requires_grad, 0, Py_False) != 1 || read_int(x, S_numel, 0, &n) ||
        read_int(x, S_data_ptr, 1, &src)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    CALL_GIL(s, n * kind_size[kind], rc, do_all_reduce(s, (const char *)src, (char *)src, n, (int)kind, f));
    return result_of(Py_NewRef(x), rc, f);
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

/* Whether a hot path writes its result straight into `out` (the caller's out=): a plain tensor of
   x's dtype and exactly `shape`, with no lazy conjugation, not requiring grad, whose `nbytes` bytes
   do not meet x's `xbytes` at src. 1 with *dst its address; 0 when not (no exception set: the
   general path then checks out and reports what is wrong, or writes through a fresh result). */
static int out_takes(Segment *s, PyObject *out, PyObject *x, PyObject *shape, uintptr_t src,
                     size_t xbytes, size_t nbytes, uintptr_t *dst) {
    if (!plain_tensor(s, out) || reads(out, S_is_conj, 1, Py_False) != 1 ||
        reads(out, S_requires_grad, 0, Py_False) != 1)
        goto no;
    PyObject *want = PyObject_GetAttr(x, S_dtype), *got = PyObject_GetAttr(out, S_dtype);
    int same = want && got && want == got;
    Py_XDECREF(want);
    Py_XDECREF(got);
    PyObject *has = same ? PyObject_GetAttr(out, S_shape) : NULL;
    same = has && PyObject_RichCompareBool(has, shape, Py_EQ) == 1;
    Py_XDECREF(has);
    if (!same || read_int(out, S_data_ptr, 1, dst)) goto no;
    if (nbytes && xbytes && *dst < src + xbytes && src < *dst + nbytes) goto no;
    return 1;
no:
    PyErr_Clear();
    return 0;
}

/* The common end of the gathers' hot paths: post this rank's block (counts[me] bytes at src),
   allocate the result (hot_new(x, shape); shape is a new reference, released here) or take
   `given` (the caller's out, when not NULL and out_takes it; else None, having done nothing), and
   finish the gather into it (finish_gather's rows and stride). */
static PyObject *gather_posted(Segment *s, PyObject *x, uintptr_t src, PyObject *shape,
                               const size_t *counts, size_t rows, size_t stride, PyObject *given) {
    size_t displ[MAXW], most, total = offsets(counts, s->world, displ, &most);
    uintptr_t dst;
    if (given && !out_takes(s, given, x, shape, src, counts[s->rank], total, &dst)) {
        Py_DECREF(shape);
        Py_RETURN_NONE;
    }
    begin(s, describe(OP_GATHER, -1, counts, s->world));
    post_one_shot(s, (const char *)src, counts[s->rank]);
    PyObject *out = given ? Py_NewRef(given) : allocate(s, s->hot_new, x, shape, 1, &dst);
    Py_DECREF(shape);
    if (!out) return NULL;
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    CALL_GIL(s, total, rc, finish_gather(s, (const char *)src, (char *)dst, counts, rows, stride, f));
    return result_of(out, rc, f);
}

/* gather_fresh(x, dim[, out]): torch.cat of every rank's x along dim (an int, negative from the
   end) in a fresh tensor, or in out (when given, not None and out_takes it), or None, having
   done nothing, for what this hot path does not take: anything but a plain tensor of a dtype in
   hot_sizes, of at least one dimension, with no lazy conjugation, a dim out of range, an empty
   tensor, an out that out_takes refuses, or a gather that does not fit one round of the slots.
   Publishes x before allocating the result (hot_new(x, shape): x.new_empty), and writes the
   blocks straight to their places along dim. */
static PyObject *seg_gather_fresh(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3 || !PyLong_CheckExact(a[1]) || !hot_ready(s) || !plain_tensor(s, a[0]))
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
    return gather_posted(s, x, src, bigger, counts, rows, row_bytes * (size_t)s->world,
                         nargs == 3 && a[2] != Py_None ? a[2] : NULL);
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

/* gatherv_fresh(x, dim, sizes[, out]): all_gatherv along dim 0: rank 0's rows, then rank 1's, ...
   (sizes[r] rows from rank r; None: every rank has x's rows) in a fresh tensor or in out (as
   gather_fresh), or None, having done nothing, for what this hot path does not take: anything but
   a plain tensor of a dtype in hot_sizes, of at least one dimension, with no lazy conjugation,
   dim other than 0 (or -ndim), sizes whose entry for this rank is not x's rows, an out that
   out_takes refuses, or a gather that does not fit one round of the slots. Publishes x before
   allocating the result (hot_new(x, shape)). */
static PyObject *seg_gatherv_fresh(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4 || !PyLong_CheckExact(a[1]) || !hot_ready(s) || !plain_tensor(s, a[0]))
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
    PyObject *given = nargs == 4 && a[3] != Py_None ? a[3] : NULL;
    return gather_posted(s, x, src, bigger, counts, 1, 0, given);
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

/* scatter_fresh(x, dim, sizes[, out]): reduce_scatter(v) along dim 0: this rank's rows of the sum
   over ranks of x (rows [sum(sizes[:r]), +sizes[r]) for rank r; sizes None: an even split) in a
   fresh tensor or in out (as gather_fresh), or None, having done nothing, for what this hot path
   does not take: anything but a plain tensor of a dtype summed here with at least one dimension,
   dim other than 0 (or -ndim), sizes that do not split the rows, an out that out_takes refuses,
   or a reduce_scatter that does not fit one round of the slots. Publishes x before allocating the
   result (hot_new(x, shape)). */
static PyObject *seg_scatter_fresh(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    int takes = (nargs == 3 || nargs == 4) && PyLong_CheckExact(a[1]) && hot_ready(s);
    long kind = takes ? hot_kind(s, a[0]) : 0;
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
    size_t displ[MAXW], most, per = scatter_part(s, (int)kind), summed = offsets(counts, w, displ, &most);
    PyObject *given = nargs == 4 && a[3] != Py_None ? a[3] : NULL;
    if (given && !out_takes(s, given, x, smaller, src, summed * kind_size[kind],
                            counts[me] * kind_size[kind], &dst)) {
        Py_DECREF(smaller);
        Py_RETURN_NONE;
    }
    begin(s, describe(OP_SCATTER, kind, counts, w));
    post_scatter_round(s, (const char *)src, counts, displ, 0, per, kind_size[kind]);
    out = given ? Py_NewRef(given) : allocate(s, s->hot_new, x, smaller, 1, &dst);
    Py_DECREF(smaller);
    if (!out) return NULL;
    Failure fail_;
    Failure *f = &fail_;
    int rc;
    CALL_GIL(s, counts[me] * kind_size[kind] * (size_t)w, rc,
             finish_scatter_round(s, (char *)dst, counts, 0, per, (int)kind, f));
    return result_of(out, rc, f);
}

/* reduce_scatter(src, dst, counts, kind): counts in elements, one per rank; a wide kind (sums.h)
   writes float32 results */
static PyObject *seg_reduce_scatter(Segment *s, PyObject *const *a, Py_ssize_t nargs) {
    ARGS(4);
    size_t counts[MAXW];
    char *src = PyLong_AsVoidPtr(a[0]), *dst = PyLong_AsVoidPtr(a[1]);
    long kind = PyLong_AsLong(a[3]);
    int wide = kind == KIND_BF16_WIDE || kind == KIND_F16_WIDE;
    if (PyErr_Occurred() || !(wide || kind_ok(kind)) || get_sizes(a[2], counts, s->world))
        return NULL;
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
    {"sum_into", (PyCFunction)seg_sum_into, METH_O, "sum_into(x): x <- the sum of every rank's x; x, or None"},
    {"gather_fresh", (PyCFunction)(void (*)(void))seg_gather_fresh, METH_FASTCALL,
     "gather_fresh(x, dim[, out]): torch.cat of every rank's x along dim, fresh or in out, or None"},
    {"gatherv_fresh", (PyCFunction)(void (*)(void))seg_gatherv_fresh, METH_FASTCALL,
     "gatherv_fresh(x, dim, sizes[, out]): every rank's rows of x along dim 0, fresh or in out, or None"},
    {"scatter_fresh", (PyCFunction)(void (*)(void))seg_scatter_fresh, METH_FASTCALL,
     "scatter_fresh(x, dim, sizes[, out]): this rank's rows of the sum of every rank's x, fresh or in out, or None"},
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
    find_fast_strings();
    choose_sums();
    const char *names[] = {"dtype", "layout", "is_nested", "is_cpu", "is_neg", "is_contiguous", "numel",
                           "data_ptr", "shape", "is_conj", "requires_grad"};
    PyObject **interned[] = {&S_dtype, &S_layout, &S_is_nested, &S_is_cpu, &S_is_neg, &S_is_contiguous,
                             &S_numel, &S_data_ptr, &S_shape, &S_is_conj, &S_requires_grad};
    for (int i = 0; i < 11; i++)
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

