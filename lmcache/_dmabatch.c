/* Batches of host<->device copies enqueued by one call each, without the GIL (lmcache.dma_batch).
 *
 * enqueue(memcpy_async, stream, copies) -> calls
 *   memcpy_async: the address of cudaMemcpyAsync (or any function of its signature: tests pass one
 *                 that copies host memory);
 *   stream:       the cudaStream_t handle the copies go on;
 *   copies:       a sequence of (dst address, src address, nbytes) tuples.
 * Zero-byte copies are dropped; a copy that continues the previous one on both sides (dst and src
 * each start where the previous ended) joins it.
 *
 * enqueue_batch(memcpy_batch_async, stream, copies) -> calls
 *   the copies of enqueue (checked, empty ones dropped, continuations joined) in one call of
 *   cudaMemcpyBatchAsync (CUDA 13's signature), in stream order as a whole, in no order among
 *   themselves: for copies whose destinations do not overlap. Returns 1, or 0 when nothing is left.
 *
 * enqueue_2d(memcpy_2d_async, stream, copies) -> calls
 *   the same with cudaMemcpy2DAsync and (dst, dst pitch, src, src pitch, width, height) tuples:
 *   height lines of width bytes, each side's lines pitch bytes apart. Empty copies are dropped.
 *
 * Every entry is checked before anything is enqueued (addresses non-zero, sizes not negative, pitches
 * at least the width), so bad input enqueues nothing. Each returns the number of calls made; a call
 * that fails stops the batch: RuntimeError naming the CUDA error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define MEMCPY_DEFAULT 4 /* cudaMemcpyDefault: the direction follows from the (unified) addresses */

typedef int (*memcpy_async_fn)(void *dst, const void *src, size_t count, int kind, void *stream);
typedef int (*memcpy_2d_async_fn)(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                                  size_t height, int kind, void *stream);

typedef struct {
    uint64_t dst, src, nbytes;
} copy_t;

/* cudaMemcpyAttributes: where each side is (no hint here) and when the source may be read. */
typedef struct {
    int type, id;
} mem_location_t;

typedef struct {
    int src_access_order;
    mem_location_t src_loc_hint, dst_loc_hint;
    unsigned int flags;
} memcpy_attributes_t;

#define SRC_ACCESS_ORDER_STREAM 1 /* cudaMemcpySrcAccessOrderStream: the source is read in stream order */

typedef int (*memcpy_batch_async_fn)(void **dsts, void **srcs, size_t *sizes, size_t count,
                                     memcpy_attributes_t *attrs, size_t *attrs_idxs, size_t num_attrs,
                                     void *stream);

typedef struct {
    uint64_t dst, dst_pitch, src, src_pitch, width, height;
} copy_2d_t;

/* An int and not a bool, as the Python loops take (type(v) is int). */
static int is_int(PyObject *v) { return PyLong_CheckExact(v); }

/* Reads copy i into *into (a copy_t); 0 on success, -1 with a Python error set. */
static int read_copy(PyObject *item, Py_ssize_t i, void *into) {
    copy_t *out = into;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
        PyErr_Format(PyExc_ValueError, "copy %zd must be a (dst address, src address, nbytes) tuple", i);
        return -1;
    }
    for (int k = 0; k < 3; k++) {
        if (!is_int(PyTuple_GET_ITEM(item, k))) {
            PyErr_Format(PyExc_ValueError, "copy %zd: addresses must be non-negative ints, nbytes an int", i);
            return -1;
        }
    }
    unsigned long long dst = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
    unsigned long long src = 0;
    long long nbytes = 0;
    if (!PyErr_Occurred()) src = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 1));
    if (!PyErr_Occurred()) nbytes = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 2));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "copy %zd: addresses must be non-negative ints, nbytes an int", i);
        return -1;
    }
    if (dst == 0 || src == 0) {
        PyErr_Format(PyExc_ValueError, "copy %zd: a null address", i);
        return -1;
    }
    if (nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "copy %zd: nbytes %lld is negative", i, nbytes);
        return -1;
    }
    out->dst = dst;
    out->src = src;
    out->nbytes = (uint64_t)nbytes;
    return 0;
}

typedef int (*reader_fn)(PyObject *item, Py_ssize_t i, void *into);

/* Parses (runtime function address, stream, copies); 0 on success, -1 with a Python error set. */
static int parse_args(PyObject *args, const char *fn_name, unsigned long long *fn_address,
                      unsigned long long *stream, PyObject **copies) {
    if (!PyArg_ParseTuple(args, "KKO", fn_address, stream, copies)) return -1;
    if (*fn_address == 0) {
        PyErr_Format(PyExc_ValueError, "a null %s address", fn_name);
        return -1;
    }
    return 0;
}

/* Every entry of copies read by read into a new array of elem-byte entries (PyMem_Free it), their
 * number in *n; NULL with a Python error set if one is bad, so nothing is enqueued. */
static void *read_all(PyObject *copies, size_t elem, reader_fn read, const char *what, Py_ssize_t *n) {
    PyObject *seq = PySequence_Fast(copies, what);
    if (seq == NULL) return NULL;
    *n = PySequence_Fast_GET_SIZE(seq);
    char *all = PyMem_Malloc((*n > 0 ? (size_t)*n : 1) * elem);
    if (all == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        if (read(PySequence_Fast_GET_ITEM(seq, i), i, all + (size_t)i * elem) < 0) {
            PyMem_Free(all);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    return all;
}

/* The copies read (see read_all), empty ones dropped and continuations joined, in place: their
 * number in *count. NULL with a Python error set if one is bad. */
static copy_t *read_runs(PyObject *copies, Py_ssize_t *count) {
    Py_ssize_t n;
    copy_t *runs = read_all(copies, sizeof(copy_t), read_copy,
                            "copies must be a sequence of (dst, src, nbytes) tuples", &n);
    if (runs == NULL) return NULL;
    *count = 0; /* runs[0:*count]: the copies so far */
    for (Py_ssize_t i = 0; i < n; i++) {
        copy_t c = runs[i];
        if (c.nbytes == 0) continue;
        if (*count > 0) {
            copy_t *last = &runs[*count - 1];
            if (last->dst + last->nbytes == c.dst && last->src + last->nbytes == c.src) {
                last->nbytes += c.nbytes;
                continue;
            }
        }
        runs[(*count)++] = c;
    }
    return runs;
}

/* parse_args, then read_runs of its copies. */
static copy_t *parse_runs(PyObject *args, const char *fn_name, unsigned long long *fn_address,
                          unsigned long long *stream, Py_ssize_t *count) {
    PyObject *copies;
    if (parse_args(args, fn_name, fn_address, stream, &copies) < 0) return NULL;
    return read_runs(copies, count);
}

static PyObject *enqueue(PyObject *self, PyObject *args) {
    unsigned long long fn_address, stream;
    Py_ssize_t count;
    copy_t *runs = parse_runs(args, "memcpy_async", &fn_address, &stream, &count);
    if (runs == NULL) return NULL;

    memcpy_async_fn fn = (memcpy_async_fn)(uintptr_t)fn_address;
    int err = 0;
    Py_ssize_t calls = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; calls < count; calls++) {
        err = fn((void *)(uintptr_t)runs[calls].dst, (const void *)(uintptr_t)runs[calls].src,
                 (size_t)runs[calls].nbytes, MEMCPY_DEFAULT, (void *)(uintptr_t)stream);
        if (err != 0) break;
    }
    Py_END_ALLOW_THREADS
    if (err != 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "cudaMemcpyAsync of %llu bytes (call %zd of %zd) failed with CUDA error %d",
                     (unsigned long long)runs[calls].nbytes, calls + 1, count, err);
        PyMem_Free(runs);
        return NULL;
    }
    PyMem_Free(runs);
    return PyLong_FromSsize_t(calls);
}

static PyObject *enqueue_batch(PyObject *self, PyObject *args) {
    unsigned long long fn_address, stream;
    Py_ssize_t count;
    copy_t *runs = parse_runs(args, "memcpy_batch_async", &fn_address, &stream, &count);
    if (runs == NULL) return NULL;
    PyObject *result = NULL;
    /* One block for the three arrays the call reads: destinations, sources, sizes. */
    void **arrays = count > 0 ? PyMem_Malloc((size_t)count * (2 * sizeof(void *) + sizeof(size_t))) : NULL;
    if (count == 0) {
        result = PyLong_FromLong(0);
    } else if (arrays == NULL) {
        PyErr_NoMemory();
    } else {
        void **dsts = arrays, **srcs = arrays + count;
        size_t *sizes = (size_t *)(arrays + 2 * count);
        for (Py_ssize_t i = 0; i < count; i++) {
            dsts[i] = (void *)(uintptr_t)runs[i].dst;
            srcs[i] = (void *)(uintptr_t)runs[i].src;
            sizes[i] = (size_t)runs[i].nbytes;
        }
        memcpy_attributes_t attrs = {SRC_ACCESS_ORDER_STREAM, {0, 0}, {0, 0}, 0};
        size_t first = 0;
        memcpy_batch_async_fn fn = (memcpy_batch_async_fn)(uintptr_t)fn_address;
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = fn(dsts, srcs, sizes, (size_t)count, &attrs, &first, 1, (void *)(uintptr_t)stream);
        Py_END_ALLOW_THREADS
        if (err != 0) {
            PyErr_Format(PyExc_RuntimeError, "cudaMemcpyBatchAsync of %zd copies failed with CUDA error %d",
                         count, err);
        } else {
            result = PyLong_FromLong(1);
        }
    }
    PyMem_Free(arrays);
    PyMem_Free(runs);
    return result;
}

/* Reads 2-D copy i into *into (a copy_2d_t); 0 on success, -1 with a Python error set. */
static int read_copy_2d(PyObject *item, Py_ssize_t i, void *into) {
    copy_2d_t *out = into;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 6) {
        PyErr_Format(PyExc_ValueError,
                     "copy %zd must be a (dst, dst pitch, src, src pitch, width, height) tuple", i);
        return -1;
    }
    long long v[6];
    for (int k = 0; k < 6; k++) {
        if (!is_int(PyTuple_GET_ITEM(item, k))) {
            PyErr_Format(PyExc_ValueError, "copy %zd: every field must be an int", i);
            return -1;
        }
        v[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(item, k));
        if (PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "copy %zd: every field must be an int", i);
            return -1;
        }
        if (v[k] < 0) {
            PyErr_Format(PyExc_ValueError, "copy %zd: field %d is negative (%lld)", i, k, v[k]);
            return -1;
        }
    }
    if (v[0] == 0 || v[2] == 0) {
        PyErr_Format(PyExc_ValueError, "copy %zd: a null address", i);
        return -1;
    }
    if (v[5] > 1 && (v[1] < v[4] || v[3] < v[4])) {
        PyErr_Format(PyExc_ValueError, "copy %zd: pitches %lld and %lld must be at least the width %lld", i,
                     v[1], v[3], v[4]);
        return -1;
    }
    out->dst = v[0];
    out->dst_pitch = v[1];
    out->src = v[2];
    out->src_pitch = v[3];
    out->width = v[4];
    out->height = v[5];
    return 0;
}

static PyObject *enqueue_2d(PyObject *self, PyObject *args) {
    unsigned long long fn_address, stream;
    PyObject *copies;
    Py_ssize_t n;
    if (parse_args(args, "memcpy_2d_async", &fn_address, &stream, &copies) < 0) return NULL;
    copy_2d_t *todo =
        read_all(copies, sizeof(copy_2d_t), read_copy_2d, "copies must be a sequence of 6-tuples", &n);
    if (todo == NULL) return NULL;
    Py_ssize_t count = 0; /* todo[0:count]: the copies so far, empty ones dropped */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (todo[i].width != 0 && todo[i].height != 0) todo[count++] = todo[i];
    }

    memcpy_2d_async_fn fn = (memcpy_2d_async_fn)(uintptr_t)fn_address;
    int err = 0;
    Py_ssize_t calls = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; calls < count; calls++) {
        copy_2d_t *c = &todo[calls];
        err = fn((void *)(uintptr_t)c->dst, (size_t)c->dst_pitch, (const void *)(uintptr_t)c->src,
                 (size_t)c->src_pitch, (size_t)c->width, (size_t)c->height, MEMCPY_DEFAULT,
                 (void *)(uintptr_t)stream);
        if (err != 0) break;
    }
    Py_END_ALLOW_THREADS
    if (err != 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "cudaMemcpy2DAsync of %llu x %llu bytes (call %zd of %zd) failed with CUDA error %d",
                     (unsigned long long)todo[calls].height, (unsigned long long)todo[calls].width, calls + 1,
                     count, err);
        PyMem_Free(todo);
        return NULL;
    }
    PyMem_Free(todo);
    return PyLong_FromSsize_t(calls);
}

static PyMethodDef methods[] = {
    {"enqueue", enqueue, METH_VARARGS,
     "enqueue(memcpy_async, stream, copies) -> calls: (dst, src, nbytes) copies, adjacent ones joined, "
     "enqueued without the GIL."},
    {"enqueue_batch", enqueue_batch, METH_VARARGS,
     "enqueue_batch(memcpy_batch_async, stream, copies) -> calls: the copies of enqueue in one "
     "cudaMemcpyBatchAsync call, without the GIL."},
    {"enqueue_2d", enqueue_2d, METH_VARARGS,
     "enqueue_2d(memcpy_2d_async, stream, copies) -> calls: (dst, dst pitch, src, src pitch, width, height) "
     "copies enqueued without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dmabatch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dmabatch(void) { return PyModule_Create(&module); }
