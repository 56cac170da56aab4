/* polyrpc/wire/_frames.h: what the frame codec's C code (polyrpc.wire._frames) offers the
 * C code of the layers above it, through a capsule rather than shared symbols, so each
 * extension stays optional and builds alone.
 *
 * A user includes this header and calls polyrpc_frames_import() once (module init); it
 * returns NULL with ImportError set when the codec's extension is missing, and the Python
 * module using that extension then falls back to its pure-Python reference.
 */
#ifndef POLYRPC_WIRE_FRAMES_H
#define POLYRPC_WIRE_FRAMES_H

#include <Python.h>

#define POLYRPC_FRAMES_CAPSULE_ATTR "_C_API"
#define POLYRPC_FRAMES_CAPSULE "polyrpc.wire._frames._C_API"

/* A decoded frame (polyrpc.wire._frames.Frame): its fields are readable by layout, since
 * the codec owns this struct and publishes it here. */
typedef struct {
    PyObject_HEAD
    PyObject *kind;
    PyObject *seq;
    PyObject *method;
    PyObject *metadata;
    PyObject *payload;
    PyObject *codec;
    PyObject *flags;
} FrameObject;

typedef struct {
    /* the Frame type: a frame of exactly this type has the layout above */
    PyTypeObject *frame_type;
    /* encode_plain(kind, seq, payload): the list of buffers of a frame with no method, no
     * metadata, codec 0 and no flags; NULL with *ok == 0 and no exception when the
     * arguments are not the plain kind (the caller takes its Python path), NULL with
     * *ok == 1 on an error */
    PyObject *(*encode_plain)(PyObject *kind, PyObject *seq, PyObject *payload, int *ok);
    /* whether a C FrameDecoder is serving a request that arrived alone (1 or 0); -1,
     * without an exception, for any other object */
    int (*serving_one)(PyObject *decoder);
} PolyrpcFramesCAPI;

/* The codec's C API (borrowed, lives as long as the process), or NULL with an exception. */
static inline const PolyrpcFramesCAPI *
polyrpc_frames_import(void)
{
    /* PyCapsule_Import imports only "polyrpc" and looks the rest up as attributes */
    PyObject *module = PyImport_ImportModule("polyrpc.wire._frames");
    if (module == NULL)
        return NULL;
    Py_DECREF(module);
    const PolyrpcFramesCAPI *api = PyCapsule_Import(POLYRPC_FRAMES_CAPSULE, 0);
    if (api == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) { /* an older build */
        PyErr_Clear();
        PyErr_SetString(PyExc_ImportError, "polyrpc.wire._frames exports no C API");
    }
    return api;
}

#endif
