/* mpicomm._blocks: recycled host memory for large results (docs/architecture.md, "Results").

   block(nbytes, huge) returns a Block: a writable buffer of nbytes bytes that torch.frombuffer
   turns into a tensor. torch keeps the Block alive exactly as long as the tensor's storage; when
   the storage is freed the Block dies and its memory goes back to a free list here, from which a
   later block() of the same size takes it. So a block never serves a new result while any tensor
   still uses it, and a recycled result is never a page-faulting, kernel-zeroed new mapping.

   The free list keeps at most PER_SIZE blocks of one size and MAX_BYTES in all (the rest is
   unmapped). Every entry point runs with the GIL held (torch takes it to drop the Block). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <sys/mman.h>

#define PER_SIZE 2
#define MAX_BYTES ((size_t)256 << 20)
#define MAXFREE 32
#define HUGE_PAGE ((size_t)2 << 20)

typedef struct {
    char *base;   /* the mapping */
    size_t span;  /* its bytes */
    char *mem;    /* the block's first byte (2 MiB aligned when huge) */
    size_t size;  /* the block's bytes */
} Memory;

typedef struct {
    PyObject_HEAD
    Memory m;
} Block;

static Memory free_list[MAXFREE];
static int free_count;
static size_t free_bytes;
static unsigned long long reused;

static int map_memory(Memory *m, size_t size, int huge) {
    size_t span = huge ? size + HUGE_PAGE : size;
    void *base = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return -1;
    m->base = base;
    m->span = span;
    m->mem = base;
    m->size = size;
#ifdef MADV_HUGEPAGE
    if (huge) { /* start on a 2 MiB boundary, and ask for huge pages under the whole block */
        m->mem = (char *)(((uintptr_t)base + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
        madvise(m->mem, size, MADV_HUGEPAGE);
    }
#endif
    return 0;
}

static void give_back(Memory *m) {
    int same = 0;
    for (int i = 0; i < free_count; i++) same += free_list[i].size == m->size;
    if (same < PER_SIZE && free_count < MAXFREE && free_bytes + m->size <= MAX_BYTES) {
        free_list[free_count++] = *m;
        free_bytes += m->size;
    } else {
        munmap(m->base, m->span);
    }
}

static void block_dealloc(Block *b) {
    if (b->m.base) give_back(&b->m);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static int block_getbuffer(Block *b, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)b, b->m.mem, (Py_ssize_t)b->m.size, 0, flags);
}

static PyBufferProcs block_as_buffer = {(getbufferproc)block_getbuffer, NULL};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpicomm._blocks.Block",
    .tp_basicsize = sizeof(Block),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "host memory of one result; back to the free list when it dies",
    .tp_dealloc = (destructor)block_dealloc,
    .tp_as_buffer = &block_as_buffer,
};

/* block(nbytes, huge) -> Block */
static PyObject *blocks_block(PyObject *self, PyObject *const *a, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "block(nbytes, huge)");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(a[0]);
    int huge = PyObject_IsTrue(a[1]);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size <= 0 || huge < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "block: nbytes must be > 0");
        return NULL;
    }
    Block *b = PyObject_New(Block, &BlockType);
    if (!b) return NULL;
    for (int i = free_count - 1; i >= 0; i--) {
        if (free_list[i].size != (size_t)size) continue;
        b->m = free_list[i];
        free_list[i] = free_list[--free_count];
        free_bytes -= (size_t)size;
        reused++;
        return (PyObject *)b;
    }
    if (map_memory(&b->m, (size_t)size, huge)) {
        b->m.base = NULL;
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    return (PyObject *)b;
}

/* stats() -> (blocks reused, bytes waiting, blocks waiting) */
static PyObject *blocks_stats(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("(KnI)", reused, (Py_ssize_t)free_bytes, (unsigned)free_count);
}

/* clear(): unmap every waiting block */
static PyObject *blocks_clear(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    while (free_count > 0) {
        Memory *m = &free_list[--free_count];
        munmap(m->base, m->span);
    }
    free_bytes = 0;
    Py_RETURN_NONE;
}

static PyMethodDef blocks_methods[] = {
    {"block", (PyCFunction)(void (*)(void))blocks_block, METH_FASTCALL, "block(nbytes, huge)"},
    {"stats", blocks_stats, METH_NOARGS, "stats() -> (reused, bytes waiting, blocks waiting)"},
    {"clear", blocks_clear, METH_NOARGS, "unmap every waiting block"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef blocks_module = {PyModuleDef_HEAD_INIT, "_blocks", NULL, -1,
                                           blocks_methods};

PyMODINIT_FUNC PyInit__blocks(void) {
    if (PyType_Ready(&BlockType) < 0) return NULL;
    PyObject *m = PyModule_Create(&blocks_module);
    if (!m) return NULL;
    Py_INCREF(&BlockType);
    PyModule_AddObject(m, "Block", (PyObject *)&BlockType);
    PyModule_AddIntConstant(m, "PER_SIZE", PER_SIZE);
    PyModule_AddIntConstant(m, "MAX_BYTES", (long)MAX_BYTES);
    return m;
}
