/* lmcache._hashchain: the chunk-hash chain of lmcache.keys.TokenHasher for a Python list, in C.
 *
 * h_i = new(h_{i-1} || int64-LE bytes of chunk i's tokens).digest(), h_{-1} = seed.
 *
 * The pure-Python path (lmcache/keys.py) is the reference; this only removes its per-chunk Python
 * glue and the whole-list struct.pack. The hash itself stays a Python call (`new` is any constructor
 * of HASH_ALGORITHMS), so the GIL is held throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h> /* Python.h includes it from 3.11 on */
#endif
#include <stdint.h>
#include <string.h>

/* v as 8 little-endian bytes: the key format is little-endian whatever the host. */
static inline void
store_le64(unsigned char *p, uint64_t v)
{
#if PY_LITTLE_ENDIAN
    memcpy(p, &v, 8); /* one unaligned store; a byte loop is not merged by GCC -O2 */
#else
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(v >> (8 * i));
    }
#endif
}

/* An exact int's value if it fits one internal digit (|v| < 2**30: every real token id), read inline:
 * PyLong_AsLongLongAndOverflow is an out-of-line call into libpython, a large share of the
 * conversion's cost (benchmarks/RESULTS.md, D15). 3.12+ has an API for it; before, the layout is the one CPython's own
 * "medium value" fast paths read (ob_digit[0] is always allocated). */
static inline int
compact_value(PyObject *item, long long *out)
{
    if (!PyLong_CheckExact(item)) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)item)) {
        *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)item);
        return 1;
    }
#else
    Py_ssize_t size = Py_SIZE(item);
    if (size >= -1 && size <= 1) {
        *out = (long long)size * (long long)((PyLongObject *)item)->ob_digit[0];
        return 1;
    }
#endif
    return 0;
}

/* Any other item: what struct's "q" accepts (ints, objects with __index__), as int64; else -1 with
 * ValueError, as the pure path's struct.error becomes. The caller checked that i is in range. */
static int
token_slow(PyObject *tokens, Py_ssize_t i, long long *out)
{
    PyObject *item = PyList_GET_ITEM(tokens, i);
    int overflow = 0;
    /* __index__ may run Python code that drops the list's reference to the item: hold one. */
    Py_INCREF(item);
    *out = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (*out == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "token ids must be integers in int64 range: item %zd is %.200s, not an integer", i,
                         Py_TYPE(item)->tp_name);
        }
        Py_DECREF(item);
        return -1;
    }
    Py_DECREF(item);
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "token ids must be integers in int64 range: item %zd is out of range",
                     i);
        return -1;
    }
    return 0;
}

/* The list must still hold tokens[:end]: `new`, digest() or an item's __index__ is Python code that
 * may have shrunk it. */
static int
check_size(PyObject *tokens, Py_ssize_t end)
{
    if (PyList_GET_SIZE(tokens) < end) {
        PyErr_SetString(PyExc_RuntimeError, "chain_digests: token list changed size while hashing");
        return -1;
    }
    return 0;
}

static PyObject *
chain_digests(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError,
                     "chain_digests(tokens, chunk_size, num_chunks, seed, new) takes 5 positional "
                     "arguments, got %zd",
                     nargs);
        return NULL;
    }
    PyObject *tokens = args[0], *seed = args[3], *new = args[4];
    if (!PyList_Check(tokens)) {
        PyErr_Format(PyExc_TypeError, "chain_digests: tokens must be a list, not %.200s",
                     Py_TYPE(tokens)->tp_name);
        return NULL;
    }
    Py_ssize_t chunk_size = PyLong_AsSsize_t(args[1]);
    if (chunk_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t num_chunks = PyLong_AsSsize_t(args[2]);
    if (num_chunks == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyBytes_Check(seed)) {
        PyErr_Format(PyExc_TypeError, "chain_digests: seed must be bytes, not %.200s",
                     Py_TYPE(seed)->tp_name);
        return NULL;
    }
    if (!PyCallable_Check(new)) {
        PyErr_SetString(PyExc_TypeError, "chain_digests: new must be callable");
        return NULL;
    }
    if (chunk_size <= 0) {
        PyErr_Format(PyExc_ValueError, "chain_digests: chunk_size must be positive, got %zd", chunk_size);
        return NULL;
    }
    /* Compared by division: num_chunks * chunk_size could overflow. */
    if (num_chunks < 0 || num_chunks > PyList_GET_SIZE(tokens) / chunk_size) {
        PyErr_Format(PyExc_ValueError,
                     "chain_digests: num_chunks must be in [0, len(tokens) // chunk_size], got %zd for %zd "
                     "tokens in chunks of %zd",
                     num_chunks, PyList_GET_SIZE(tokens), chunk_size);
        return NULL;
    }
    if (num_chunks == 0) {
        return PyBytes_FromStringAndSize(NULL, 0);
    }

    PyObject *digest_name = PyUnicode_InternFromString("digest");
    if (digest_name == NULL) {
        return NULL;
    }
    PyObject *out = NULL;    /* the concatenated digests, allocated once the digest size is known */
    Py_ssize_t digest_size = 0;
    PyObject *parent = Py_NewRef(seed);
    /* No overflow: num_chunks >= 1, so chunk_size <= len(tokens) < PY_SSIZE_T_MAX / sizeof(PyObject *). */
    Py_ssize_t data_len = chunk_size * 8;

    for (Py_ssize_t c = 0; c < num_chunks; c++) {
        /* A fresh bytes object per chunk, filled in place before anyone else sees it: no copy beyond
         * the conversion, and nothing is mutated after `new` got it (a reused buffer behind a
         * memoryview is slower: creating the memoryview costs more than the bytes object). */
        Py_ssize_t parent_len = PyBytes_GET_SIZE(parent);
        if (parent_len > PY_SSIZE_T_MAX - data_len) {
            PyErr_NoMemory();
            goto error;
        }
        PyObject *data = PyBytes_FromStringAndSize(NULL, parent_len + data_len);
        if (data == NULL) {
            goto error;
        }
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(data);
        memcpy(p, PyBytes_AS_STRING(parent), parent_len);
        p += parent_len;
        Py_ssize_t base = c * chunk_size;
        if (check_size(tokens, base + chunk_size) < 0) {
            Py_DECREF(data);
            goto error;
        }
        for (Py_ssize_t j = 0; j < chunk_size; j++) {
            long long v;
            if (!compact_value(PyList_GET_ITEM(tokens, base + j), &v)) {
                if (token_slow(tokens, base + j, &v) < 0 || check_size(tokens, base + chunk_size) < 0) {
                    Py_DECREF(data);
                    goto error;
                }
            }
            store_le64(p + 8 * j, (uint64_t)v);
        }

        PyObject *h = PyObject_CallOneArg(new, data);
        Py_DECREF(data);
        if (h == NULL) {
            goto error;
        }
        PyObject *digest = PyObject_CallMethodNoArgs(h, digest_name);
        Py_DECREF(h);
        if (digest == NULL) {
            goto error;
        }
        if (!PyBytes_Check(digest)) {
            PyErr_Format(PyExc_TypeError, "chain_digests: digest() returned %.200s, not bytes",
                         Py_TYPE(digest)->tp_name);
            Py_DECREF(digest);
            goto error;
        }
        if (out == NULL) {
            digest_size = PyBytes_GET_SIZE(digest);
            if (digest_size > PY_SSIZE_T_MAX / num_chunks) {
                PyErr_NoMemory();
                Py_DECREF(digest);
                goto error;
            }
            out = PyBytes_FromStringAndSize(NULL, digest_size * num_chunks);
            if (out == NULL) {
                Py_DECREF(digest);
                goto error;
            }
        }
        else if (PyBytes_GET_SIZE(digest) != digest_size) {
            PyErr_Format(PyExc_ValueError, "chain_digests: digest %zd has %zd bytes, the first had %zd", c,
                         PyBytes_GET_SIZE(digest), digest_size);
            Py_DECREF(digest);
            goto error;
        }
        memcpy(PyBytes_AS_STRING(out) + c * digest_size, PyBytes_AS_STRING(digest), digest_size);
        Py_SETREF(parent, digest);
    }
    Py_DECREF(parent);
    Py_DECREF(digest_name);
    return out;

error:
    Py_XDECREF(out);
    Py_DECREF(parent);
    Py_DECREF(digest_name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"chain_digests", (PyCFunction)(void (*)(void))chain_digests, METH_FASTCALL,
     "chain_digests(tokens, chunk_size, num_chunks, seed, new, /) -> bytes\n\n"
     "The concatenated digests h_0..h_{num_chunks-1} of h_i = new(h_{i-1} + int64-LE bytes of\n"
     "tokens[i*chunk_size:(i+1)*chunk_size]).digest(), h_{-1} = seed. tokens must be a list."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "lmcache._hashchain",
    .m_doc = "The chunk-hash chain of lmcache.keys.TokenHasher for Python lists, in C.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__hashchain(void)
{
    return PyModuleDef_Init(&module);
}
