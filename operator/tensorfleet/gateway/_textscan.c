/*
 * The runaway check's text extraction in C: the bodies of the JSON strings that follow a fixed prefix.
 *
 * string_bodies(data, prefix, closing) finds, from the start of ``data``, each ``prefix`` (which ends
 * with a string's opening quote), reads the string's body up to its closing quote (a backslash escapes
 * the character after it) and keeps it when the byte after that quote is ``closing`` (or whatever it is,
 * when ``closing`` is -1). It returns the kept bodies end to end, still escaped, and how many there were.
 * The result equals re.findall(re.escape(prefix) + rb'([^"\\]*(?:\\.[^"\\]*)*)"' + closing, data),
 * joined: the pure-Python path of tensorfleet.gateway.runaway_hook, which the tests hold it against.
 * Optional: where it cannot be compiled, that path runs instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static PyMethodDef methods[] = {
    {"string_bodies", string_bodies, METH_VARARGS,
     "string_bodies(data, prefix, closing) -> (bodies, count): the bodies of the JSON strings after prefix."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef textscan = {PyModuleDef_HEAD_INIT, "_textscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__textscan(void)
{
    return PyModule_Create(&textscan);
}
