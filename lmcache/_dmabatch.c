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

/* One copy of row_copies: (dst, src, nbytes) between host memory at host_at and the pool at pool_at. */
static int append_copy(PyObject *out, int to_host, unsigned long long host_at, unsigned long long pool_at,
                       unsigned long long nbytes) {
    PyObject *copy = PyTuple_New(3);
    if (copy == NULL) return -1;
    unsigned long long fields[3] = {to_host ? host_at : pool_at, to_host ? pool_at : host_at, nbytes};
    for (int k = 0; k < 3; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(fields[k]);
        if (v == NULL) {
            Py_DECREF(copy);
            return -1;
        }
        PyTuple_SET_ITEM(copy, k, v);
    }
    int err = PyList_Append(out, copy);
    Py_DECREF(copy);
    return err;
}

/* Block id j of a chunk, checked to name one of the pool's rows; -1 with a Python error set if not. */
static long long read_block(PyObject *ids, Py_ssize_t chunk, Py_ssize_t j, long long num_rows) {
    PyObject *v = PySequence_Fast_GET_ITEM(ids, j);
    long long id = is_int(v) ? PyLong_AsLongLong(v) : -1;
    if (PyErr_Occurred()) PyErr_Clear();
    if (id < 0 || id >= num_rows) {
        PyErr_Format(PyExc_ValueError, "chunk %zd: block id %zd must be an int in [0, %lld)", chunk, j, num_rows);
        return -1;
    }
    return id;
}

/* row_copies(pool, row_stride, row_bytes, num_rows, to_host, chunks): see lmcache.dma_batch.row_copies. */
static PyObject *row_copies(PyObject *self, PyObject *args) {
    unsigned long long pool, row_stride, row_bytes;
    long long num_rows;
    int to_host;
    PyObject *chunks;
    if (!PyArg_ParseTuple(args, "KKKLpO", &pool, &row_stride, &row_bytes, &num_rows, &to_host, &chunks)) return NULL;
    if (pool == 0 || row_bytes == 0 || row_stride < row_bytes) {
        PyErr_SetString(PyExc_ValueError, "row_copies: a null pool, no row bytes, or rows closer than their size");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(chunks, "chunks must be a sequence of (block ids, host address) tuples");
    if (seq == NULL) return NULL;
    PyObject *out = PyList_New(0);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t c = 0; out != NULL && c < n; c++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, c);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !is_int(PyTuple_GET_ITEM(item, 1))) {
            PyErr_Format(PyExc_ValueError, "chunk %zd must be a (block ids, host address) tuple", c);
            Py_CLEAR(out);
            break;
        }
        unsigned long long host = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 1));
        if (PyErr_Occurred() || host == 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "chunk %zd: the host address must be a non-null address", c);
            Py_CLEAR(out);
            break;
        }
        PyObject *ids = PySequence_Fast(PyTuple_GET_ITEM(item, 0), "a chunk's block ids must be a sequence");
        if (ids == NULL) {
            Py_CLEAR(out);
            break;
        }
        Py_ssize_t rows = PySequence_Fast_GET_SIZE(ids);
        for (Py_ssize_t j = 0; j < rows;) {
            long long first = read_block(ids, c, j, num_rows);
            Py_ssize_t run = 1;
            if (first >= 0 && row_stride == row_bytes) { /* packed rows: adjacent ids make one copy */
                while (j + run < rows) {
                    long long next = read_block(ids, c, j + run, num_rows);
                    if (next < 0) {
                        first = -1;
                        break;
                    }
                    if (next != first + run) break;
                    run++;
                }
            }
            if (first < 0 || append_copy(out, to_host, host + (unsigned long long)j * row_bytes,
                                         pool + (unsigned long long)first * row_stride,
                                         (unsigned long long)run * row_bytes) < 0) {
                Py_CLEAR(out);
                break;
            }
            j += run;
        }
        Py_DECREF(ids);
    }
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"enqueue", enqueue, METH_VARARGS,
     "enqueue(memcpy_async, stream, copies) -> calls: (dst, src, nbytes) copies, adjacent ones joined, "
     "enqueued without the GIL."},
    {"enqueue_batch", enqueue_batch, METH_VARARGS,
     "enqueue_batch(memcpy_batch_async, stream, copies) -> calls: the copies of enqueue in one "
     "cudaMemcpyBatchAsync call, without the GIL."},
    {"row_copies", row_copies, METH_VARARGS,
     "row_copies(pool, row_stride, row_bytes, num_rows, to_host, chunks) -> copies: the (dst, src, nbytes) "
     "copies between each chunk's host buffer and its pool rows (see lmcache.dma_batch.row_copies)."},
    {"enqueue_2d", enqueue_2d, METH_VARARGS,
     "enqueue_2d(memcpy_2d_async, stream, copies) -> calls: (dst, dst pitch, src, src pitch, width, height) "
     "copies enqueued without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dmabatch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dmabatch(void) { return PyModule_Create(&module); }
