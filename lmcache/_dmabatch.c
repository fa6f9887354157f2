/* A batch of host<->device copies enqueued by one call, without the GIL (lmcache.dma_batch).
 *
 * enqueue(memcpy_async, stream, copies) -> calls
 *   memcpy_async: the address of cudaMemcpyAsync (or any function of its signature: tests pass one
 *                 that copies host memory);
 *   stream:       the cudaStream_t handle the copies go on;
 *   copies:       a sequence of (dst address, src address, nbytes) tuples.
 *
 * Every entry is checked before anything is enqueued (addresses non-zero, sizes not negative), so bad
 * input enqueues nothing. Zero-byte copies are dropped; a copy that continues the previous one on both
 * sides (dst and src each start where the previous ended) joins it. Returns the number of
 * memcpy_async calls made. A call that fails stops the batch: RuntimeError naming the CUDA error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define MEMCPY_DEFAULT 4 /* cudaMemcpyDefault: the direction follows from the (unified) addresses */

typedef int (*memcpy_async_fn)(void *dst, const void *src, size_t count, int kind, void *stream);

typedef struct {
    uint64_t dst, src, nbytes;
} copy_t;

/* Reads entry i of seq into *out; 0 on success, -1 with a Python error set. */
static int read_copy(PyObject *item, Py_ssize_t i, copy_t *out) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
        PyErr_Format(PyExc_ValueError, "copy %zd must be a (dst address, src address, nbytes) tuple", i);
        return -1;
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

static PyObject *enqueue(PyObject *self, PyObject *args) {
    unsigned long long fn_address, stream;
    PyObject *copies;
    if (!PyArg_ParseTuple(args, "KKO", &fn_address, &stream, &copies)) return NULL;
    if (fn_address == 0) {
        PyErr_SetString(PyExc_ValueError, "a null memcpy_async address");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(copies, "copies must be a sequence of (dst, src, nbytes) tuples");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    copy_t *runs = PyMem_Malloc((n > 0 ? n : 1) * sizeof(copy_t));
    if (runs == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        copy_t c;
        if (read_copy(PySequence_Fast_GET_ITEM(seq, i), i, &c) < 0) {
            PyMem_Free(runs);
            Py_DECREF(seq);
            return NULL;
        }
        if (c.nbytes == 0) continue;
        if (count > 0) {
            copy_t *last = &runs[count - 1];
            if (last->dst + last->nbytes == c.dst && last->src + last->nbytes == c.src) {
                last->nbytes += c.nbytes;
                continue;
            }
        }
        runs[count++] = c;
    }
    Py_DECREF(seq);

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

static PyMethodDef methods[] = {
    {"enqueue", enqueue, METH_VARARGS,
     "enqueue(memcpy_async, stream, copies) -> calls: (dst, src, nbytes) copies, adjacent ones joined, "
     "enqueued without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dmabatch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dmabatch(void) { return PyModule_Create(&module); }
