/* SIGBUS guard for mappings of other processes' shared-memory files (lmcache.server.pool_sharing).
 *
 * A client may shrink the file it shared after the server mapped it; touching the lost pages raises
 * SIGBUS, which would kill the server. guard(addr, length) registers a mapping: a SIGBUS inside it
 * replaces the mapping from the faulting page to its end with anonymous zero pages (so the access
 * completes harmlessly), marks the guard as hit and returns. hit(id) tells the caller afterwards, so
 * it can refuse the copy and drop the pool. Faults outside every guarded range go to the handler
 * installed before (Python's faulthandler, or the default action).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_GUARDS 4096

typedef struct {
    volatile uintptr_t start; /* 0: free slot */
    volatile uintptr_t end;
    volatile sig_atomic_t hit;
} guard_t;

static guard_t guards[MAX_GUARDS];
static struct sigaction previous;
static int installed = 0;
static uintptr_t page_mask = 0;

static void chain(int sig, siginfo_t *info, void *context) {
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* Default action: restore it; returning re-executes the access, which then kills the process. */
    signal(sig, SIG_DFL);
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_GUARDS; i++) {
        uintptr_t start = guards[i].start, end = guards[i].end;
        if (start != 0 && addr >= start && addr < end) {
            uintptr_t page = addr & page_mask;
            if (page < start) page = start;
            void *got = mmap((void *)page, end - page, PROT_READ | PROT_WRITE,
                             MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (got == MAP_FAILED) break;
            guards[i].hit = 1;
            return;
        }
    }
    chain(sig, info, context);
}

static int install(void) {
    if (installed) return 0;
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) return -1;
    page_mask = ~((uintptr_t)sysconf(_SC_PAGESIZE) - 1);
    installed = 1;
    return 0;
}

static PyObject *py_guard(PyObject *self, PyObject *args) {
    unsigned long long addr, length;
    if (!PyArg_ParseTuple(args, "KK", &addr, &length)) return NULL;
    if (addr == 0 || length == 0) {
        PyErr_SetString(PyExc_ValueError, "guard: empty range");
        return NULL;
    }
    if (install() != 0) return PyErr_SetFromErrno(PyExc_OSError);
    for (int i = 0; i < MAX_GUARDS; i++) {
        if (guards[i].start == 0) {
            guards[i].hit = 0;
            guards[i].end = (uintptr_t)(addr + length);
            guards[i].start = (uintptr_t)addr; /* last: the slot is live once start is set */
            return PyLong_FromLong(i);
        }
    }
    PyErr_SetString(PyExc_RuntimeError, "guard: too many guarded mappings");
    return NULL;
}

static int slot(PyObject *args) {
    int i;
    if (!PyArg_ParseTuple(args, "i", &i)) return -1;
    if (i < 0 || i >= MAX_GUARDS || guards[i].start == 0) {
        PyErr_SetString(PyExc_ValueError, "no such guard");
        return -1;
    }
    return i;
}

static PyObject *py_hit(PyObject *self, PyObject *args) {
    int i = slot(args);
    if (i < 0) return NULL;
    return PyBool_FromLong(guards[i].hit);
}

static PyObject *py_unguard(PyObject *self, PyObject *args) {
    int i = slot(args);
    if (i < 0) return NULL;
    guards[i].start = 0;
    guards[i].end = 0;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"guard", py_guard, METH_VARARGS, "guard(addr, length) -> id: survive SIGBUS in this range"},
    {"hit", py_hit, METH_VARARGS, "hit(id) -> bool: whether a SIGBUS hit the range"},
    {"unguard", py_unguard, METH_VARARGS, "unguard(id): stop guarding (before unmapping)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_busguard", NULL, -1, methods};

PyMODINIT_FUNC PyInit__busguard(void) { return PyModule_Create(&module); }
