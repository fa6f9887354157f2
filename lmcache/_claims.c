/* lmcache._claims: lookups that pin L1 chunks through shared memory (lmcache.server.claims).
 *
 * The index: a power-of-two array of uint64 fingerprints, open addressing with linear probes of at
 * most MAX_PROBE entries; EMPTY (0) ends a probe, TOMB (1) is a removed entry that inserts reuse;
 * beside it, each entry's slot record (slab, offset, nbytes, serial). Only the server writes them.
 * A claim table: one uint32 count per index entry, written by one client (and the server, giving
 * claims back).
 *
 * A client claims an entry by adding one to its count, then checks that the entry still holds the
 * fingerprint; the server removes an entry by writing TOMB, then reads every client's count of it and
 * puts the fingerprint back if one is set. Both sides' write-then-read pairs are sequentially
 * consistent, so at least one side sees the other's write: either the client sees the entry gone (a
 * miss) or the server sees the claim (it keeps the chunk). A chunk a client holds a claim on is never
 * evicted.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define EMPTY 0ULL
#define TOMB 1ULL
#define MAX_PROBE 64
#define PENDING UINT64_MAX /* a slot record's byte count: the chunk is being stored, not published */

static int
table_of(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t item)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0) {
        return -1;
    }
    Py_ssize_t n = view->len / item;
    if (view->len % item || n == 0 || (n & (n - 1)) || ((uintptr_t)view->buf % item)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "a claims table must be an aligned power-of-two array");
        return -1;
    }
    return 0;
}

static inline uint64_t
fingerprint(const unsigned char *digest, uint64_t world_size, uint64_t rank)
{
    uint64_t v;
    memcpy(&v, digest, 8);
    v ^= world_size * 0x9E3779B97F4A7C15ULL;
    v ^= (rank + 1) * 0xC2B2AE3D27D4EB4FULL;
    return v < 2 ? v + 2 : v;
}

/* The entry holding fp, or -1 (a miss). */
static Py_ssize_t
find(const uint64_t *table, uint64_t mask, uint64_t fp)
{
    uint64_t i = fp & mask;
    for (int step = 0; step < MAX_PROBE; step++, i = (i + 1) & mask) {
        uint64_t v = __atomic_load_n(&table[i], __ATOMIC_SEQ_CST);
        if (v == fp) {
            return (Py_ssize_t)i;
        }
        if (v == EMPTY) {
            return -1;
        }
    }
    return -1;
}

/* The entry of fp, inserted with its slot record (written before the fingerprint, so a client that
 * finds the fingerprint finds the record), or the entry already holding fp (*found set), or -1 when
 * no entry is free within the probe. */
static Py_ssize_t
place(uint64_t *table, uint64_t *slots, uint64_t mask, uint64_t fp, const uint64_t record[4], int *found)
{
    Py_ssize_t free_at = -1;
    uint64_t i = fp & mask;
    *found = 0;
    for (int step = 0; step < MAX_PROBE; step++, i = (i + 1) & mask) {
        uint64_t v = table[i];
        if (v == fp) {
            *found = 1;
            return (Py_ssize_t)i;
        }
        if (v <= TOMB && free_at < 0) {
            free_at = (Py_ssize_t)i;
        }
        if (v == EMPTY) {
            break;
        }
    }
    if (free_at >= 0) {
        memcpy(slots + 4 * free_at, record, 4 * sizeof(uint64_t));
        __atomic_store_n(&table[free_at], fp, __ATOMIC_SEQ_CST);
    }
    return free_at;
}

static int
index_of(PyObject *table_obj, PyObject *slots_obj, Py_buffer *table, Py_buffer *slots)
{
    if (table_of(table_obj, table, 1, 8) != 0) {
        return -1;
    }
    if (table_of(slots_obj, slots, 1, 8) != 0) {
        PyBuffer_Release(table);
        return -1;
    }
    if (slots->len != 4 * table->len) {
        PyBuffer_Release(slots);
        PyBuffer_Release(table);
        PyErr_SetString(PyExc_ValueError, "four slot words per index entry");
        return -1;
    }
    return 0;
}

/* add(table, slots, digest, world_size, rank, slab, offset, nbytes, serial) -> (entry, fp): a chunk
 * published. Its entry if it was marked as being stored (its record is written, the byte count
 * last), else a new one; entry -1 when it is indexed already or no entry is free. */
static PyObject *
py_add(PyObject *self, PyObject *args)
{
    PyObject *table_obj, *slots_obj;
    Py_buffer digest, table, slots;
    unsigned long long world_size, rank, slab, offset, nbytes, serial;
    if (!PyArg_ParseTuple(args, "OOy*KKKKKK", &table_obj, &slots_obj, &digest, &world_size, &rank, &slab,
                          &offset, &nbytes, &serial)) {
        return NULL;
    }
    if (digest.len < 8 || index_of(table_obj, slots_obj, &table, &slots) != 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "a chunk digest has at least 8 bytes");
        }
        PyBuffer_Release(&digest);
        return NULL;
    }
    uint64_t fp = fingerprint(digest.buf, world_size, rank);
    uint64_t record[4] = {slab, offset, nbytes, serial};
    uint64_t *tab = table.buf, *rec = slots.buf;
    int found;
    Py_ssize_t at = place(tab, rec, (uint64_t)(table.len / 8) - 1, fp, record, &found);
    if (found) {
        uint64_t *held = rec + 4 * at;
        if (__atomic_load_n(&held[2], __ATOMIC_SEQ_CST) == PENDING) {
            held[0] = slab;
            held[1] = offset;
            held[3] = serial;
            __atomic_store_n(&held[2], (uint64_t)nbytes, __ATOMIC_SEQ_CST);
        } else {
            at = -1; /* another key of the same fingerprint: this one stays out (a miss) */
        }
    }
    PyBuffer_Release(&slots);
    PyBuffer_Release(&table);
    PyBuffer_Release(&digest);
    return Py_BuildValue("nK", at, (unsigned long long)fp);
}

/* mark(table, slots, digests, digest_size, world_size, rank) -> bytes: the chunks of ``digests`` are
 * being stored. For each, (fingerprint, entry) as two uint64: the entry marked, or -1 (as uint64)
 * when the chunk is indexed already (published or marked) or no entry is free. */
static PyObject *
py_mark(PyObject *self, PyObject *args)
{
    PyObject *table_obj, *slots_obj;
    Py_buffer digests, table, slots;
    Py_ssize_t digest_size;
    unsigned long long world_size, rank;
    if (!PyArg_ParseTuple(args, "OOy*nKK", &table_obj, &slots_obj, &digests, &digest_size, &world_size, &rank)) {
        return NULL;
    }
    if (digest_size < 8 || digests.len % digest_size || index_of(table_obj, slots_obj, &table, &slots) != 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "mark: digests of 8 bytes or more");
        }
        PyBuffer_Release(&digests);
        return NULL;
    }
    Py_ssize_t count = digests.len / digest_size;
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * 16);
    if (out != NULL) {
        uint64_t *pairs = (uint64_t *)PyBytes_AS_STRING(out), mask = (uint64_t)(table.len / 8) - 1;
        const uint64_t record[4] = {0, 0, PENDING, 0};
        for (Py_ssize_t k = 0; k < count; k++) {
            uint64_t fp = fingerprint((const unsigned char *)digests.buf + k * digest_size, world_size, rank);
            int found;
            Py_ssize_t at = place(table.buf, slots.buf, mask, fp, record, &found);
            pairs[2 * k] = fp;
            pairs[2 * k + 1] = found ? UINT64_MAX : (uint64_t)at;
        }
    }
    PyBuffer_Release(&slots);
    PyBuffer_Release(&table);
    PyBuffer_Release(&digests);
    return out;
}

/* remove(table, entry, fp): the entry becomes TOMB if it holds fp. */
static PyObject *
py_remove(PyObject *self, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t at;
    unsigned long long fp;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OnK", &obj, &at, &fp) || table_of(obj, &view, 1, 8) != 0) {
        return NULL;
    }
    uint64_t *table = view.buf;
    if (at >= 0 && at < view.len / 8 && table[at] == fp) {
        __atomic_store_n(&table[at], TOMB, __ATOMIC_SEQ_CST);
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* evictable(table, entry, fp, counts) -> bool. The entry is removed unless one of the claim tables in
 * the sequence counts claims on it: then it is put back, and False. */
static PyObject *
py_evictable(PyObject *self, PyObject *args)
{
    PyObject *obj, *seq;
    Py_ssize_t at;
    unsigned long long fp;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OnKO", &obj, &at, &fp, &seq) || table_of(obj, &view, 1, 8) != 0) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "counts must be a sequence of claim tables");
    if (fast == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    uint64_t *table = view.buf;
    Py_ssize_t entries = view.len / 8;
    int claimed = 0;
    if (at >= 0 && at < entries && table[at] == fp) {
        __atomic_store_n(&table[at], TOMB, __ATOMIC_SEQ_CST);
        for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(fast) && !claimed; k++) {
            Py_buffer counts;
            if (table_of(PySequence_Fast_GET_ITEM(fast, k), &counts, 0, 4) != 0) {
                __atomic_store_n(&table[at], (uint64_t)fp, __ATOMIC_SEQ_CST);
                Py_DECREF(fast);
                PyBuffer_Release(&view);
                return NULL;
            }
            if (counts.len / 4 == entries) {
                claimed = __atomic_load_n(&((uint32_t *)counts.buf)[at], __ATOMIC_SEQ_CST) != 0;
            }
            PyBuffer_Release(&counts);
        }
        if (claimed) {
            __atomic_store_n(&table[at], (uint64_t)fp, __ATOMIC_SEQ_CST);
        }
    }
    Py_DECREF(fast);
    PyBuffer_Release(&view);
    return PyBool_FromLong(!claimed);
}

/* claim(table, slots, counts, digests, digest_size, world_size, ranks) -> (chunks, entries, pending).
 * For each chunk in order (each of its ranks' keys), claim the entries of its fingerprints; stop at
 * the first chunk with a key missing, or pending (being stored: then ``pending`` is True, and only
 * the server can say whether it is published yet). entries: the claimed entries as uint32. */
static PyObject *
py_claim(PyObject *self, PyObject *args)
{
    PyObject *table_obj, *slots_obj, *counts_obj, *ranks_obj;
    Py_buffer digests, tview, sview, cview;
    Py_ssize_t digest_size;
    unsigned long long world_size;
    if (!PyArg_ParseTuple(args, "OOOy*nKO", &table_obj, &slots_obj, &counts_obj, &digests, &digest_size,
                          &world_size, &ranks_obj)) {
        return NULL;
    }
    PyObject *ranks = PySequence_Fast(ranks_obj, "ranks must be a sequence of ints");
    if (ranks == NULL) {
        PyBuffer_Release(&digests);
        return NULL;
    }
    int held_views = 0;
    PyObject *result = NULL;
    uint64_t *ranks_v = NULL;
    if (table_of(table_obj, &tview, 0, 8) != 0) {
        goto done;
    }
    held_views = 1;
    if (table_of(slots_obj, &sview, 0, 8) != 0) {
        goto done;
    }
    held_views = 2;
    if (table_of(counts_obj, &cview, 1, 4) != 0) {
        goto done;
    }
    held_views = 3;
    Py_ssize_t width = PySequence_Fast_GET_SIZE(ranks);
    Py_ssize_t entries = tview.len / 8;
    if (cview.len / 4 != entries || sview.len != 4 * tview.len || digest_size < 8 ||
        digests.len % digest_size || width < 1) {
        PyErr_SetString(PyExc_ValueError, "claim: tables of one index, 8+ byte digests, ranks");
        goto done;
    }
    ranks_v = PyMem_Malloc(width * sizeof(uint64_t));
    if (ranks_v == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t r = 0; r < width; r++) {
        ranks_v[r] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(ranks, r));
    }
    if (PyErr_Occurred()) {
        goto done;
    }
    Py_ssize_t chunks = digests.len / digest_size;
    PyObject *out = PyBytes_FromStringAndSize(NULL, chunks * width * 4);
    if (out == NULL) {
        goto done;
    }
    const uint64_t *table = tview.buf, *slots = sview.buf, mask = (uint64_t)entries - 1;
    uint32_t *counts = cview.buf, *got = (uint32_t *)PyBytes_AS_STRING(out);
    const unsigned char *digest = digests.buf;
    Py_ssize_t taken = 0, held = 0;
    int pending = 0;
    for (; taken < chunks && !pending; taken++) {
        int whole = 1;
        for (Py_ssize_t r = 0; r < width; r++) {
            uint64_t fp = fingerprint(digest + taken * digest_size, world_size, ranks_v[r]);
            Py_ssize_t e = find(table, mask, fp);
            if (e < 0) {
                whole = 0;
                break;
            }
            if (__atomic_load_n(&slots[4 * e + 2], __ATOMIC_SEQ_CST) == PENDING) {
                pending = 1;
                break;
            }
            __atomic_fetch_add(&counts[e], 1, __ATOMIC_SEQ_CST);
            got[held++] = (uint32_t)e;
        }
        if (!whole || pending) {
            break;
        }
    }
    /* Each claim was made before its entry is checked again: an entry removed (or being stored
     * again) meanwhile ends the hit there. */
    Py_ssize_t valid = 0;
    for (; valid < taken; valid++) {
        int whole = 1;
        for (Py_ssize_t r = 0; r < width; r++) {
            uint64_t fp = fingerprint(digest + valid * digest_size, world_size, ranks_v[r]);
            uint32_t e = got[valid * width + r];
            if (__atomic_load_n(&table[e], __ATOMIC_SEQ_CST) != fp ||
                __atomic_load_n(&slots[4 * (Py_ssize_t)e + 2], __ATOMIC_SEQ_CST) == PENDING) {
                whole = 0;
            }
        }
        if (!whole) {
            pending = 1; /* changed under the claim: let the server answer */
            break;
        }
    }
    for (Py_ssize_t k = valid * width; k < held; k++) {
        __atomic_fetch_sub(&counts[got[k]], 1, __ATOMIC_SEQ_CST);
    }
    if (_PyBytes_Resize(&out, valid * width * 4) == 0) {
        result = Py_BuildValue("nNO", valid, out, pending ? Py_True : Py_False);
    }
done:
    PyMem_Free(ranks_v);
    if (held_views >= 3) {
        PyBuffer_Release(&cview);
    }
    if (held_views >= 2) {
        PyBuffer_Release(&sview);
    }
    if (held_views >= 1) {
        PyBuffer_Release(&tview);
    }
    Py_DECREF(ranks);
    PyBuffer_Release(&digests);
    return result;
}

/* unclaim(counts, entries): give back claims (uint32 entries); a count never goes below zero. */
static PyObject *
py_unclaim(PyObject *self, PyObject *args)
{
    PyObject *counts_obj;
    Py_buffer cview, entries;
    if (!PyArg_ParseTuple(args, "Oy*", &counts_obj, &entries)) {
        return NULL;
    }
    if (table_of(counts_obj, &cview, 1, 4) != 0) {
        PyBuffer_Release(&entries);
        return NULL;
    }
    uint32_t *counts = cview.buf;
    Py_ssize_t n = cview.len / 4, given = 0;
    const unsigned char *p = entries.buf;
    for (Py_ssize_t k = 0; k + 4 <= entries.len; k += 4) {
        uint32_t e;
        memcpy(&e, p + k, 4);
        if ((Py_ssize_t)e >= n) {
            continue;
        }
        uint32_t c = __atomic_load_n(&counts[e], __ATOMIC_SEQ_CST);
        while (c > 0 && !__atomic_compare_exchange_n(&counts[e], &c, c - 1, 0, __ATOMIC_SEQ_CST,
                                                     __ATOMIC_SEQ_CST)) {
        }
        given += c > 0;
    }
    PyBuffer_Release(&cview);
    PyBuffer_Release(&entries);
    return PyLong_FromSsize_t(given);
}

static PyMethodDef methods[] = {
    {"add", py_add, METH_VARARGS, "add(table, slots, digest, world_size, rank, slab, offset, nbytes, serial)"},
    {"mark", py_mark, METH_VARARGS, "mark(table, slots, digests, digest_size, world_size, rank) -> pairs"},
    {"remove", py_remove, METH_VARARGS, "remove(table, entry, fp)"},
    {"evictable", py_evictable, METH_VARARGS, "evictable(table, entry, fp, counts) -> bool"},
    {"claim", py_claim, METH_VARARGS, "claim(table, slots, counts, digests, digest_size, world_size, ranks)"},
    {"unclaim", py_unclaim, METH_VARARGS, "unclaim(counts, entries) -> claims given back"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_claims", NULL, -1, methods};

PyMODINIT_FUNC PyInit__claims(void) { return PyModule_Create(&module); }
