/*
 * The runaway check's hot loops in C (optional: where this cannot be compiled, the same work runs in
 * Python, and the tests hold the two to the same results).
 *
 * string_bodies(data, prefix, closing) finds, from the start of ``data``, each ``prefix`` (which ends
 * with a string's opening quote), reads the string's body up to its closing quote (a backslash escapes
 * the character after it) and keeps it when the byte after that quote is ``closing`` (or whatever it is,
 * when ``closing`` is -1). It returns the kept bodies end to end, still escaped, and how many there were.
 * The result equals re.findall(re.escape(prefix) + rb'([^"\\]*(?:\\.[^"\\]*)*)"' + closing, data),
 * joined: the pure-Python path of tensorfleet.gateway.runaway_hook.
 *
 * DetectorCore(ngram_size, max_repeats, window, max_punctuation_run) is
 * tensorfleet.gateway.runaway.RunawayDetector's reading of text (given in UTF-8), with the repetition
 * signal read straight from the definition: for every period p up to the
 * window it keeps how many words in a row have equalled the word p before them, and a run trips once it
 * spans more than max_repeats blocks (whole periods, at least an n-gram): run >= (max_repeats + 1) *
 * block - p. That costs time in proportion to the window for every word (well under a nanosecond per
 * period: the loop has no branches and is vectorised), so the detector uses it for windows up to a
 * limit and its probing algorithm beyond. Words are compared by Python's hash of their bytes (SipHash,
 * keyed per process, 64 bits): a false match needs a collision of that hash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The closing quote of the string whose body starts at p, or NULL if it does not end before end. */
static const char *closing_quote(const char *p, const char *end)
{
    while (p < end) {
        const char *quote = memchr(p, '"', (size_t)(end - p));
        const char *limit = quote != NULL ? quote : end;
        const char *backslash = memchr(p, '\\', (size_t)(limit - p));
        if (backslash == NULL)
            return quote;
        p = backslash + 2; /* the escaped character is part of the body, whatever it is */
    }
    return NULL;
}

static PyObject *string_bodies(PyObject *module, PyObject *args)
{
    Py_buffer data, prefix;
    int closing;
    PyObject *bodies = NULL, *result = NULL;
    Py_ssize_t used = 0, count = 0;

    (void)module;
    if (!PyArg_ParseTuple(args, "y*y*i:string_bodies", &data, &prefix, &closing))
        return NULL;
    if (prefix.len == 0) {
        PyErr_SetString(PyExc_ValueError, "string_bodies: the prefix is empty");
        goto done;
    }
    bodies = PyBytes_FromStringAndSize(NULL, data.len);
    if (bodies == NULL)
        goto done;
    const char *p = data.buf, *end = p + data.len;
    char *out = PyBytes_AS_STRING(bodies);
    while (p < end) {
        const char *at = memmem(p, (size_t)(end - p), prefix.buf, (size_t)prefix.len);
        if (at == NULL)
            break;
        const char *begin = at + prefix.len, *quote = closing_quote(begin, end);
        if (quote == NULL)
            break; /* no later prefix can hold a string that ends either */
        if (closing >= 0 && (quote + 1 >= end || (unsigned char)quote[1] != closing)) {
            p = at + 1; /* not this one: look for the prefix again from the next byte */
            continue;
        }
        memcpy(out + used, begin, (size_t)(quote - begin));
        used += quote - begin;
        count++;
        p = quote + 1 + (closing >= 0);
    }
    if (_PyBytes_Resize(&bodies, used) == 0)
        result = Py_BuildValue("(Nn)", bodies, count);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&prefix);
    return result;
}

/* ---- DetectorCore ------------------------------------------------------------------------------------ */

/* What hash() of a bytes object with these contents returns (-1 with an exception set on failure). */
static inline Py_hash_t hash_bytes(const char *data, Py_ssize_t size)
{
#if PY_VERSION_HEX >= 0x030E0000
    return Py_HashBuffer(data, size);
#elif PY_VERSION_HEX >= 0x030D0000 /* 3.13 has no function for it outside the interpreter's own headers */
    PyObject *word = PyBytes_FromStringAndSize(data, size);
    if (word == NULL)
        return -1;
    Py_hash_t hash = PyObject_Hash(word);
    Py_DECREF(word);
    return hash;
#else
    return _Py_HashBytes(data, size);
#endif
}

#define PIECE 16 /* characters: longer words are counted in pieces of this size (runaway.PIECE) */

static unsigned char word_byte[256]; /* ASCII [A-Za-z0-9_] (set up by the module) */

typedef struct {
    PyObject_HEAD
    Py_ssize_t window, max_punctuation_run;
    Py_ssize_t punct_run;  /* gap characters in a row up to the end of the text so far */
    long long count;       /* words seen */
    int32_t *threshold;    /* [window + 1]: the run at period p that trips */
    int32_t *run;          /* [window + 1]: words in a row, up to the newest, equal to the word p before them */
    uint32_t *low, *high;  /* the hashes of the latest words, oldest first: [0, used), in halves (SSE2
                              compares 32-bit lanes, so the loop in push() is vectorised on any x86-64) */
    Py_ssize_t used, capacity;
    Py_ssize_t pending_size, pending_chars; /* the text ends in a word: its last piece, which may go on */
    char pending[4 * PIECE];                /* (in UTF-8) */
} DetectorCore;

static void DetectorCore_dealloc(DetectorCore *self)
{
    PyMem_Free(self->threshold);
    PyMem_Free(self->run);
    PyMem_Free(self->low);
    PyMem_Free(self->high);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int DetectorCore_init(DetectorCore *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"ngram_size", "max_repeats", "window", "max_punctuation_run", NULL};
    Py_ssize_t ngram, repeats, window, punctuation;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nnnn:DetectorCore", keywords, &ngram, &repeats, &window,
                                     &punctuation))
        return -1;
    if (ngram < 1 || repeats < 1 || punctuation < 0 || window < 1 || window > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "DetectorCore: ngram_size and max_repeats must be at least 1, "
                                          "max_punctuation_run at least 0, window from 1 to 1048576");
        return -1;
    }
    PyMem_Free(self->threshold);
    PyMem_Free(self->run);
    PyMem_Free(self->low);
    PyMem_Free(self->high);
    self->window = window;
    self->max_punctuation_run = punctuation;
    self->punct_run = 0;
    self->count = 0;
    self->pending_size = self->pending_chars = 0;
    self->capacity = 2 * window + 64;
    self->used = 0;
    self->threshold = PyMem_Calloc((size_t)window + 1, sizeof(int32_t));
    self->run = PyMem_Calloc((size_t)window + 1, sizeof(int32_t));
    self->low = PyMem_Calloc((size_t)self->capacity, sizeof(uint32_t));
    self->high = PyMem_Calloc((size_t)self->capacity, sizeof(uint32_t));
    if (self->threshold == NULL || self->run == NULL || self->low == NULL || self->high == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t p = 1; p <= window; p++) { /* a run trips once it spans max_repeats + 1 blocks */
        long long block = (ngram + p - 1) / p * p, trips = (repeats + 1) * block - p;
        self->threshold[p] = trips > INT32_MAX ? INT32_MAX : (int32_t)trips;
    }
    return 0;
}

/* The next word, by its hash: 1 if a run trips at it. */
static inline int push(DetectorCore *self, Py_hash_t hash)
{
    const Py_ssize_t window = self->window;
    if (self->used == self->capacity) { /* keep the latest window of words */
        const size_t kept = (size_t)window * sizeof(uint32_t);
        memmove(self->low, self->low + self->used - window, kept);
        memmove(self->high, self->high + self->used - window, kept);
        self->used = window;
    }
    const uint32_t low = (uint32_t)(uint64_t)hash, high = (uint32_t)((uint64_t)hash >> 32);
    const Py_ssize_t reach = self->used < window ? self->used : window;
    /* the word p before the new one: low_end[-p], high_end[-p] */
    const uint32_t *restrict low_end = self->low + self->used, *restrict high_end = self->high + self->used;
    int32_t *restrict run = self->run;
    const int32_t *restrict threshold = self->threshold;
    int32_t tripped = 0;
    for (Py_ssize_t p = 1; p <= reach; p++) {
        const int32_t equal = (low_end[-p] == low) & (high_end[-p] == high);
        const int32_t length = equal ? run[p] + 1 : 0;
        run[p] = length;
        tripped |= length >= threshold[p];
    }
    self->low[self->used] = low;
    self->high[self->used++] = high;
    self->count++;
    return tripped != 0;
}

/* push() for a word given by its UTF-8 text: 1 if a run trips at it, -1 on an error. */
static int emit(DetectorCore *self, const char *word, Py_ssize_t size)
{
    const Py_hash_t hash = hash_bytes(word, size);
    if (hash == -1 && PyErr_Occurred())
        return -1;
    return push(self, hash);
}

/* Ideographs and kana: each is a word of its own (runaway._CJK). */
static inline int is_cjk(Py_UCS4 c)
{
    return (c >= 0x3040 && c <= 0x30ff) || (c >= 0x3400 && c <= 0x4dbf) || (c >= 0x4e00 && c <= 0x9fff) ||
           (c >= 0xf900 && c <= 0xfaff);
}

/* The code point at text[0] (of at most left bytes) and its length in bytes; an invalid byte reads as
 * U+FFFD on its own (the caller hands over valid UTF-8; surrogates, as Python's "surrogatepass" writes
 * them, are read). */
static inline Py_UCS4 decode(const unsigned char *text, Py_ssize_t left, Py_ssize_t *length)
{
    const unsigned char c = text[0];
    if (c >= 0xc2 && c < 0xe0 && left >= 2 && (text[1] & 0xc0) == 0x80) {
        *length = 2;
        return ((Py_UCS4)(c & 0x1f) << 6) | (text[1] & 0x3f);
    }
    if (c >= 0xe0 && c < 0xf0 && left >= 3 && (text[1] & 0xc0) == 0x80 && (text[2] & 0xc0) == 0x80) {
        *length = 3;
        return ((Py_UCS4)(c & 0x0f) << 12) | ((Py_UCS4)(text[1] & 0x3f) << 6) | (text[2] & 0x3f);
    }
    if (c >= 0xf0 && c < 0xf5 && left >= 4 && (text[1] & 0xc0) == 0x80 && (text[2] & 0xc0) == 0x80 &&
        (text[3] & 0xc0) == 0x80) {
        *length = 4;
        return ((Py_UCS4)(c & 0x07) << 18) | ((Py_UCS4)(text[1] & 0x3f) << 12) |
               ((Py_UCS4)(text[2] & 0x3f) << 6) | (text[3] & 0x3f);
    }
    *length = 1;
    return 0xfffd;
}

static PyObject *tripped_at(Py_ssize_t at, int punctuation)
{
    return Py_BuildValue("(nO)", at, punctuation ? Py_True : Py_False);
}

static PyObject *DetectorCore_feed(DetectorCore *self, PyObject *arg)
{
    Py_buffer data;
    PyObject *result = NULL;
    char piece[4 * PIECE];
    int tripped;

    if (self->run == NULL) {
        PyErr_SetString(PyExc_ValueError, "DetectorCore: not initialised");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *text = data.buf;
    const Py_ssize_t limit = self->max_punctuation_run;
    Py_ssize_t size = self->pending_size, chars = self->pending_chars, run = self->punct_run;
    Py_ssize_t at = 0; /* characters of data read */
    memcpy(piece, self->pending, (size_t)size);
    self->pending_size = self->pending_chars = 0;
/* The piece so far is a word: hand it over; on a trip, the result is where it ends. */
#define END_PIECE()                                                                                          \
    if (size > 0) {                                                                                          \
        if ((tripped = emit(self, piece, size)) != 0) {                                                      \
            result = tripped < 0 ? NULL : tripped_at(at, 0);                                                 \
            goto done;                                                                                       \
        }                                                                                                    \
        size = chars = 0;                                                                                    \
    }
    for (Py_ssize_t i = 0; i < data.len; at++) {
        const unsigned char c = text[i];
        Py_ssize_t length = 1;
        int word, gap;
        if (c < 0x80) {
            word = word_byte[c];
            gap = !word;
        } else {
            const Py_UCS4 code = decode(text + i, data.len - i, &length);
            word = Py_UNICODE_ISALNUM(code);
            gap = !word;
            if (is_cjk(code)) { /* a word of its own (and a gap too, where it is not a letter: "・") */
                END_PIECE();
                if ((tripped = emit(self, (const char *)text + i, length)) != 0) {
                    result = tripped < 0 ? NULL : tripped_at(at + 1, 0);
                    goto done;
                }
                word = 0;
            }
        }
        if (word) {
            if (chars == PIECE)
                END_PIECE(); /* a long word: its next piece starts here */
            memcpy(piece + size, text + i, (size_t)length);
            size += length;
            chars++;
            run = 0;
        } else if (gap) {
            END_PIECE();
            if (++run > limit) {
                result = tripped_at(at + 1, 1);
                goto done;
            }
        } else {
            run = 0;
        }
        i += length;
    }
#undef END_PIECE
    memcpy(self->pending, piece, (size_t)size); /* the text ends in a word: it may go on */
    self->pending_size = size;
    self->pending_chars = chars;
    self->punct_run = run;
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    return result;
}

static PyObject *DetectorCore_get_count(DetectorCore *self, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(self->count);
}

static PyGetSetDef DetectorCore_getset[] = {
    {"count", (getter)DetectorCore_get_count, NULL, "words seen", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef DetectorCore_methods[] = {
    {"feed", (PyCFunction)DetectorCore_feed, METH_O,
     "feed(data) -> (at, punctuation) | None: the next piece of text, in UTF-8; where it tripped (characters "
     "of data up to the trip point) and whether on the punctuation signal, or None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DetectorCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tensorfleet.gateway._textscan.DetectorCore",
    .tp_doc = "DetectorCore(ngram_size, max_repeats, window, max_punctuation_run): the runaway detector "
              "in C, for windows up to runaway.NATIVE_MAX_WINDOW.",
    .tp_basicsize = sizeof(DetectorCore),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DetectorCore_init,
    .tp_dealloc = (destructor)DetectorCore_dealloc,
    .tp_methods = DetectorCore_methods,
    .tp_getset = DetectorCore_getset,
};

/* ---- the module ---- */

static PyMethodDef methods[] = {
    {"string_bodies", string_bodies, METH_VARARGS,
     "string_bodies(data, prefix, closing) -> (bodies, count): the bodies of the JSON strings after prefix."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef textscan = {PyModuleDef_HEAD_INIT, "_textscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__textscan(void)
{
    for (int c = 0; c < 256; c++)
        word_byte[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
    if (PyType_Ready(&DetectorCoreType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&textscan);
    if (module == NULL)
        return NULL;
    Py_INCREF(&DetectorCoreType);
    if (PyModule_AddObject(module, "DetectorCore", (PyObject *)&DetectorCoreType) < 0) {
        Py_DECREF(&DetectorCoreType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
