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
#include <stdint.h>

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

/* The frame decoder (polyrpc.wire._frames.FrameDecoder), published so that a subtype in
 * another layer can extend it (the session's routing decoder); its fields are the codec's
 * to read and write, a subtype uses the functions below. */
typedef struct WindowObject WindowObject;

typedef struct {
    PyObject_HEAD
    PyObject *limits;
    int64_t max_frame, max_metadata, max_method; /* the frame limit now; cached from limits */
    PyObject *max_frame_obj;                     /* the frame limit as given (for messages) */
    char handshaking; /* handshake mode: see the type's doc and set_max_frame() */
    char after_hello; /* handshake mode saw a HELLO: later bytes wait for set_max_frame */
    char grow;        /* the last read filled the offered space: double the buffer next */
    PyObject *buf;                               /* bytearray of small frames */
    Py_ssize_t start, end;                       /* unparsed bytes are buf[start:end] */
    Py_ssize_t offered;                          /* free bytes the last get_buffer offered */
    Py_ssize_t want; /* bytes of a pending frame to hold from start (get_buffer makes room) */
    PyObject *large; /* bytes of a big payload being filled (not yet seen by anyone), or NULL;
                      * its size is what is allocated so far, it grows to large_size */
    Py_ssize_t large_filled, large_size;
    PyObject *large_frame;  /* the frame whose payload ``large`` is */
    PyObject *methods;      /* method-name cache: raw bytes -> str */
    PyObject *last_raw;     /* the most recent method cache hit, to skip the lookup */
    PyObject *last_method;
    PyObject *broken;       /* the ProtocolError that broke the decoder, or NULL */
    WindowObject *window;   /* exports the writable tail for get_buffer */
    unsigned long long bytes_received;
} DecoderObject;

typedef struct {
    /* the Frame type: a frame of exactly this type has the layout above */
    PyTypeObject *frame_type;
    /* the FrameDecoder type, which may be subclassed (its instances start with DecoderObject) */
    PyTypeObject *decoder_type;
    /* where polyrpc.errors.ProtocolError is kept: what the decoder raises on bad input */
    PyObject **protocol_error;
    /* encode_plain(kind, seq, payload): the list of buffers of a frame with no method, no
     * metadata, codec 0 and no flags; NULL with *ok == 0 and no exception when the
     * arguments are not the plain kind (the caller takes its Python path), NULL with
     * *ok == 1 on an error */
    PyObject *(*encode_plain)(PyObject *kind, PyObject *seq, PyObject *payload, int *ok);
    /* decoder.buffer_updated(nbytes) (``name`` is the method named in errors) and
     * decoder.feed(data): the new list of frames completed, or NULL with an exception */
    PyObject *(*filled)(PyObject *decoder, PyObject *nbytes, const char *name);
    PyObject *(*feed)(PyObject *decoder, PyObject *data);
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
