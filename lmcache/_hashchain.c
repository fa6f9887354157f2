/* lmcache._hashchain: the chunk-hash chain of lmcache.keys.TokenHasher for a Python list, in C.
 *
 * h_i = new(h_{i-1} || new(int64-LE bytes of chunk i's tokens).digest()).digest(), h_{-1} = seed.
 *
 * The pure-Python path (lmcache/keys.py) is the reference. chain_digests takes any constructor of
 * HASH_ALGORITHMS and calls it from C (the GIL held throughout); blake3_chain_digests, the default
 * algorithm's path, hashes in native code (_blake3.c): the inner hashes depend on one chunk each, so
 * they are computed side by side, and only the short outer links run one after another.
 * blake3_chain_bytes does the same for token ids already in key format (the server's wire arrays).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h> /* Python.h includes it from 3.11 on */
#endif
#include <stdint.h>
#include <string.h>

#include "_blake3.h"

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

/* How many items ahead the conversion asks for a token's int object: the objects lie scattered over the
 * heap, and after the host idled (a lookup between forwards) reading each one waits on memory; asked
 * for early, the reads overlap instead of following one another (RESULTS.md, D83). */
#define TOKEN_PREFETCH_DISTANCE 128

/* tokens[start:end] as int64-LE bytes into out; -1 with an exception on a bad item. An item's
 * __index__ is Python code that may shrink the list: it must still hold tokens[:end]. */
static int
convert_tokens(PyObject *tokens, Py_ssize_t start, Py_ssize_t end, unsigned char *out)
{
    for (Py_ssize_t i = start; i < end; i++, out += 8) {
        long long v;
#if defined(__GNUC__) || defined(__clang__)
        if (i + TOKEN_PREFETCH_DISTANCE < PyList_GET_SIZE(tokens)) { /* the next group's too */
            __builtin_prefetch(PyList_GET_ITEM(tokens, i + TOKEN_PREFETCH_DISTANCE));
        }
#endif
        if (!compact_value(PyList_GET_ITEM(tokens, i), &v)) {
            if (token_slow(tokens, i, &v) < 0) {
                return -1;
            }
            if (PyList_GET_SIZE(tokens) < end) {
                PyErr_SetString(PyExc_RuntimeError, "chain_digests: token list changed size while hashing");
                return -1;
            }
        }
        store_le64(out, (uint64_t)v);
    }
    return 0;
}

/* The arguments both chains share. */
typedef struct {
    PyObject *tokens;
    Py_ssize_t chunk_size;
    Py_ssize_t num_chunks;
    PyObject *seed;
} ChainArgs;

static int
parse_chain_args(const char *signature, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
                 ChainArgs *a)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments, got %zd", signature, expected, nargs);
        return -1;
    }
    a->tokens = args[0];
    a->seed = args[3];
    if (!PyList_Check(a->tokens)) {
        PyErr_Format(PyExc_TypeError, "%s: tokens must be a list, not %.200s", signature,
                     Py_TYPE(a->tokens)->tp_name);
        return -1;
    }
    a->chunk_size = PyLong_AsSsize_t(args[1]);
    if (a->chunk_size == -1 && PyErr_Occurred()) {
        return -1;
    }
    a->num_chunks = PyLong_AsSsize_t(args[2]);
    if (a->num_chunks == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!PyBytes_Check(a->seed)) {
        PyErr_Format(PyExc_TypeError, "%s: seed must be bytes, not %.200s", signature, Py_TYPE(a->seed)->tp_name);
        return -1;
    }
    if (a->chunk_size <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: chunk_size must be positive, got %zd", signature, a->chunk_size);
        return -1;
    }
    /* Compared by division: num_chunks * chunk_size could overflow. */
    if (a->num_chunks < 0 || a->num_chunks > PyList_GET_SIZE(a->tokens) / a->chunk_size) {
        PyErr_Format(PyExc_ValueError,
                     "%s: num_chunks must be in [0, len(tokens) // chunk_size], got %zd for %zd tokens in "
                     "chunks of %zd",
                     signature, a->num_chunks, PyList_GET_SIZE(a->tokens), a->chunk_size);
        return -1;
    }
    return 0;
}

/* new(input).digest(), checked to be bytes. Takes the reference to `input`; a NULL `input` (a failed
 * allocation) passes its exception through. */
static PyObject *
digest_of(PyObject *new, PyObject *digest_name, PyObject *input)
{
    if (input == NULL) {
        return NULL;
    }
    PyObject *h = PyObject_CallOneArg(new, input);
    Py_DECREF(input);
    if (h == NULL) {
        return NULL;
    }
    PyObject *digest = PyObject_CallMethodNoArgs(h, digest_name);
    Py_DECREF(h);
    if (digest != NULL && !PyBytes_Check(digest)) {
        PyErr_Format(PyExc_TypeError, "chain_digests: digest() returned %.200s, not bytes",
                     Py_TYPE(digest)->tp_name);
        Py_CLEAR(digest);
    }
    return digest;
}

/* One link of the chain: new(parent || new(chunk).digest()).digest(). */
static PyObject *
link_digest(PyObject *new, PyObject *digest_name, PyObject *parent, const unsigned char *chunk,
            Py_ssize_t chunk_len)
{
    PyObject *leaf = digest_of(new, digest_name, PyBytes_FromStringAndSize((const char *)chunk, chunk_len));
    if (leaf == NULL) {
        return NULL;
    }
    Py_ssize_t parent_len = PyBytes_GET_SIZE(parent), leaf_len = PyBytes_GET_SIZE(leaf);
    /* Filled before `new` sees it, and never touched after. */
    PyObject *joined = PyBytes_FromStringAndSize(NULL, parent_len + leaf_len);
    if (joined != NULL) {
        memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(parent), parent_len);
        memcpy(PyBytes_AS_STRING(joined) + parent_len, PyBytes_AS_STRING(leaf), leaf_len);
    }
    Py_DECREF(leaf);
    return digest_of(new, digest_name, joined);
}

static PyObject *
chain_digests(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    ChainArgs a;
    if (parse_chain_args("chain_digests(tokens, chunk_size, num_chunks, seed, new)", args, nargs, 5, &a) < 0) {
        return NULL;
    }
    PyObject *new = args[4];
    if (!PyCallable_Check(new)) {
        PyErr_SetString(PyExc_TypeError, "chain_digests: new must be callable");
        return NULL;
    }
    if (a.num_chunks == 0) {
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    /* No overflow: num_chunks * chunk_size <= len(tokens) < PY_SSIZE_T_MAX / sizeof(PyObject *). */
    unsigned char *tokens = PyMem_Malloc((size_t)a.num_chunks * a.chunk_size * 8);
    if (tokens == NULL) {
        return PyErr_NoMemory();
    }
    if (convert_tokens(a.tokens, 0, a.num_chunks * a.chunk_size, tokens) < 0) {
        PyMem_Free(tokens);
        return NULL;
    }
    PyObject *digest_name = PyUnicode_InternFromString("digest");
    if (digest_name == NULL) {
        PyMem_Free(tokens);
        return NULL;
    }
    PyObject *out = NULL; /* the concatenated digests, allocated once the digest size is known */
    Py_ssize_t digest_size = 0;
    PyObject *parent = Py_NewRef(a.seed);
    Py_ssize_t data_len = a.chunk_size * 8;
    for (Py_ssize_t c = 0; c < a.num_chunks; c++) {
        PyObject *digest = link_digest(new, digest_name, parent, tokens + c * data_len, data_len);
        if (digest == NULL) {
            goto error;
        }
        if (out == NULL) {
            digest_size = PyBytes_GET_SIZE(digest);
            out = digest_size <= PY_SSIZE_T_MAX / a.num_chunks
                      ? PyBytes_FromStringAndSize(NULL, digest_size * a.num_chunks)
                      : PyErr_NoMemory();
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
    PyMem_Free(tokens);
    return out;

error:
    Py_XDECREF(out);
    Py_DECREF(parent);
    Py_DECREF(digest_name);
    PyMem_Free(tokens);
    return NULL;
}

/* The chain's outer links over the inner hashes, in place: digest c overwrites inner hash c once
 * it is read. */
static void
chain_inner_hashes(const unsigned char *seed, unsigned char *digests, Py_ssize_t num_chunks)
{
    unsigned char block[2 * LM_BLAKE3_OUT_LEN];
    memcpy(block, seed, LM_BLAKE3_OUT_LEN);
    for (Py_ssize_t c = 0; c < num_chunks; c++) {
        unsigned char *digest = digests + c * LM_BLAKE3_OUT_LEN;
        memcpy(block + LM_BLAKE3_OUT_LEN, digest, LM_BLAKE3_OUT_LEN);
        lm_blake3_64(block, digest);
        memcpy(block, digest, LM_BLAKE3_OUT_LEN);
    }
}

static PyObject *
blake3_chain_digests(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    ChainArgs a;
    if (parse_chain_args("blake3_chain_digests(tokens, chunk_size, num_chunks, seed)", args, nargs, 4, &a) < 0) {
        return NULL;
    }
    if (PyBytes_GET_SIZE(a.seed) != LM_BLAKE3_OUT_LEN) {
        PyErr_Format(PyExc_ValueError, "blake3_chain_digests: seed must be a %d-byte digest, got %zd bytes",
                     LM_BLAKE3_OUT_LEN, PyBytes_GET_SIZE(a.seed));
        return NULL;
    }
    if (a.num_chunks == 0) {
        return PyBytes_FromStringAndSize(NULL, 0); /* chunk_size is unbounded then: size nothing by it */
    }
    /* A group of chunks at a time: converted while the group's buffer stays in cache, then hashed
     * side by side. The GIL stays held: released, a lookup could wait for another thread to give it
     * back, far longer than the hashing takes. */
    Py_ssize_t group = a.num_chunks < LM_BLAKE3_LANES ? a.num_chunks : LM_BLAKE3_LANES;
    Py_ssize_t data_len = a.chunk_size * 8;
    unsigned char *buffer = PyMem_Malloc((size_t)group * data_len);
    PyObject *out = PyBytes_FromStringAndSize(NULL, LM_BLAKE3_OUT_LEN * a.num_chunks);
    if (buffer == NULL || out == NULL) {
        PyMem_Free(buffer);
        Py_XDECREF(out);
        return out == NULL ? NULL : PyErr_NoMemory();
    }
    unsigned char *digests = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t first = 0; first < a.num_chunks; first += group) {
        Py_ssize_t n = a.num_chunks - first < group ? a.num_chunks - first : group;
        if (convert_tokens(a.tokens, first * a.chunk_size, (first + n) * a.chunk_size, buffer) < 0 ||
            lm_blake3_many(buffer, (size_t)data_len, (size_t)n, digests + first * LM_BLAKE3_OUT_LEN) < 0) {
            if (!PyErr_Occurred()) {
                PyErr_NoMemory();
            }
            PyMem_Free(buffer);
            Py_DECREF(out);
            return NULL;
        }
    }
    PyMem_Free(buffer);
    chain_inner_hashes((const unsigned char *)PyBytes_AS_STRING(a.seed), digests, a.num_chunks);
    return out;
}

static PyObject *
blake3_chain_bytes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *signature = "blake3_chain_bytes(data, chunk_size, num_chunks, seed)";
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "%s takes 4 positional arguments, got %zd", signature, nargs);
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
    PyObject *seed = args[3];
    if (!PyBytes_Check(seed) || PyBytes_GET_SIZE(seed) != LM_BLAKE3_OUT_LEN) {
        PyErr_Format(PyExc_ValueError, "%s: seed must be a %d-byte digest (bytes)", signature, LM_BLAKE3_OUT_LEN);
        return NULL;
    }
    if (chunk_size <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: chunk_size must be positive, got %zd", signature, chunk_size);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    /* Compared by division: num_chunks * chunk_size * 8 could overflow. */
    if (num_chunks < 0 || num_chunks > view.len / 8 / chunk_size) {
        PyErr_Format(PyExc_ValueError,
                     "%s: num_chunks must be in [0, len(data) // 8 // chunk_size], got %zd for %zd bytes in "
                     "chunks of %zd tokens",
                     signature, num_chunks, view.len, chunk_size);
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, LM_BLAKE3_OUT_LEN * num_chunks);
    unsigned char *digests = out != NULL ? (unsigned char *)PyBytes_AS_STRING(out) : NULL;
    /* num_chunks >= 1 bounds chunk_size * 8 by len(data): no overflow. */
    if (out != NULL && num_chunks > 0 &&
        lm_blake3_many(view.buf, (size_t)chunk_size * 8, (size_t)num_chunks, digests) < 0) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
    PyBuffer_Release(&view);
    if (out != NULL) {
        chain_inner_hashes((const unsigned char *)PyBytes_AS_STRING(seed), digests, num_chunks);
    }
    return out;
}

static PyObject *
blake3_lane_widths(PyObject *module, PyObject *unused)
{
    int widths[3];
    int n = lm_blake3_lane_widths(widths);
    PyObject *out = PyTuple_New(n);
    for (int i = 0; out != NULL && i < n; i++) {
        PyObject *width = PyLong_FromLong(widths[i]);
        if (width == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, width);
    }
    return out;
}

static PyObject *
blake3_digests(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *signature = "blake3_digests(data, length, lanes)";
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s takes 3 positional arguments, got %zd", signature, nargs);
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[1]);
    if (length == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long lanes = PyLong_AsLong(args[2]);
    if (lanes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (length <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: length must be positive, got %zd", signature, length);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t count = view.len / length;
    PyObject *out = PyBytes_FromStringAndSize(NULL, LM_BLAKE3_OUT_LEN * count);
    if (out != NULL) {
        /* Called even for no input, so that a width this CPU lacks is refused either way. */
        int rc = lanes < INT_MIN || lanes > INT_MAX ? -2
                                         : lm_blake3_many_lanes(view.buf, (size_t)length, (size_t)count,
                                                                (unsigned char *)PyBytes_AS_STRING(out), (int)lanes);
        if (rc == -2) {
            PyErr_Format(PyExc_ValueError, "%s: lanes must be one of blake3_lane_widths(), got %ld", signature,
                         lanes);
        }
        else if (rc < 0) {
            PyErr_NoMemory();
        }
        if (rc < 0) {
            Py_CLEAR(out);
        }
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"chain_digests", (PyCFunction)(void (*)(void))chain_digests, METH_FASTCALL,
     "chain_digests(tokens, chunk_size, num_chunks, seed, new, /) -> bytes\n\n"
     "The concatenated digests h_0..h_{num_chunks-1} of h_i = new(h_{i-1} + new(int64-LE bytes of\n"
     "tokens[i*chunk_size:(i+1)*chunk_size]).digest()).digest(), h_{-1} = seed. tokens must be a list."},
    {"blake3_chain_digests", (PyCFunction)(void (*)(void))blake3_chain_digests, METH_FASTCALL,
     "blake3_chain_digests(tokens, chunk_size, num_chunks, seed, /) -> bytes\n\n"
     "chain_digests(tokens, chunk_size, num_chunks, seed, blake3.blake3) in native code: the chunks'\n"
     "inner hashes side by side in SIMD lanes, then the chain. seed is 32 bytes."},
    {"blake3_chain_bytes", (PyCFunction)(void (*)(void))blake3_chain_bytes, METH_FASTCALL,
     "blake3_chain_bytes(data, chunk_size, num_chunks, seed, /) -> bytes\n\n"
     "blake3_chain_digests over token ids already laid out as int64-LE bytes (any contiguous buffer:\n"
     "bytes, a memoryview, a numpy '<i8' array), read in place: nothing to convert."},
    {"blake3_lane_widths", (PyCFunction)blake3_lane_widths, METH_NOARGS,
     "blake3_lane_widths() -> tuple[int, ...]\n\n"
     "How many inputs this CPU's builds of the native BLAKE3 hash side by side, widest (the one used)\n"
     "first."},
    {"blake3_digests", (PyCFunction)(void (*)(void))blake3_digests, METH_FASTCALL,
     "blake3_digests(data, length, lanes, /) -> bytes\n\n"
     "The BLAKE3 digests of len(data) // length consecutive inputs of length bytes, hashed lanes at a\n"
     "time (one of blake3_lane_widths()): how tests check every width this CPU runs."},
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
