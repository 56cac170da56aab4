/* polyrpc.wire._frames: a C accelerator for the frame codec in polyrpc/wire/frames.py.
 *
 * The pure-Python module is the reference: this file implements the same Frame,
 * FrameDecoder, encode_plain and encode_frame with the same results and the same
 * ProtocolError messages. Rare paths (malformed metadata, error hints, unusual
 * argument types) call back into the Python helpers so the two cannot drift apart.
 * It also carries the payload scans msgpack_counts and json_counts (reference:
 * polyrpc/wire/codecs.py), and exports Frame, the decoder and the plain encoder to the
 * other layers' C code through the capsule described in _frames.h.
 *
 * Wire layout (little-endian, 24-byte header):
 *   0 magic "PR" | 2 version | 3 kind | 4 codec | 5 flags | 6 u16 method length
 *   8 u64 seq | 16 u32 metadata length | 20 u32 payload length | method | metadata | payload
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#include "_frames.h"

#define HEADER_SIZE 24
#define FRAME_VERSION 1
#define KIND_MIN 1
#define KIND_MAX 11
#define KIND_REQUEST 2
#define KIND_RESPONSE 3
#define KIND_ERROR 4
#define LARGE_PAYLOAD (128 << 10)
#define INITIAL_BUFFER (4 << 10)
#define MAX_BUFFER (256 << 10)
#define LARGE_STEP (256 << 10)
#define KIND_HELLO 1
#define MIN_READ 4096
#define CACHE_MAX 4096
#define U16_MAX 0xFFFFu
#define U32_MAX 0xFFFFFFFFu

static PyObject *ProtocolError;      /* polyrpc.errors.ProtocolError */
static PyObject *empty_str;          /* "" */
static PyObject *empty_bytes;        /* b"" */
static PyObject *empty_metadata;     /* the shared {} of frames without metadata */
static PyObject *method_bytes_cache; /* encoder: method str -> UTF-8 bytes */
static PyObject *frames_module;      /* polyrpc.wire.frames, imported on first use */

/* ------------------------------------------------------------------ helpers */

/* An attribute of polyrpc.wire.frames (new reference), for the rare paths only. */
static PyObject *
py_helper(const char *name)
{
    if (frames_module == NULL) {
        frames_module = PyImport_ImportModule("polyrpc.wire.frames");
        if (frames_module == NULL)
            return NULL;
    }
    return PyObject_GetAttrString(frames_module, name);
}

static inline uint16_t
rd16(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t
rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t
rd64(const unsigned char *p)
{
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

static inline void
wr16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void
wr32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void
wr64(unsigned char *p, uint64_t v)
{
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

/* ===================================================================== Frame */

static PyTypeObject FrameType;

/* A new Frame owning the seven given references (all non-NULL, consumed even on failure). */
static PyObject *
frame_make(PyObject *kind, PyObject *seq, PyObject *method, PyObject *metadata,
           PyObject *payload, PyObject *codec, PyObject *flags)
{
    FrameObject *f = PyObject_GC_New(FrameObject, &FrameType);
    if (f == NULL) {
        Py_DECREF(kind);
        Py_DECREF(seq);
        Py_DECREF(method);
        Py_DECREF(metadata);
        Py_DECREF(payload);
        Py_DECREF(codec);
        Py_DECREF(flags);
        return NULL;
    }
    f->kind = kind;
    f->seq = seq;
    f->method = method;
    f->metadata = metadata;
    f->payload = payload;
    f->codec = codec;
    f->flags = flags;
    PyObject_GC_Track(f);
    return (PyObject *)f;
}

static int
Frame_init(FrameObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "seq", "method", "metadata", "payload", "codec", "flags", NULL};
    PyObject *kind, *seq, *method = empty_str, *metadata = empty_metadata;
    PyObject *payload = empty_bytes, *codec = NULL, *flags = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOOOO:Frame", kwlist, &kind, &seq, &method,
                                     &metadata, &payload, &codec, &flags))
        return -1;
    if (codec == NULL)
        codec = PyLong_FromLong(0); /* small ints are immortal-ish cached objects */
    else
        Py_INCREF(codec);
    if (flags == NULL)
        flags = PyLong_FromLong(0);
    else
        Py_INCREF(flags);
    Py_XSETREF(self->kind, Py_NewRef(kind));
    Py_XSETREF(self->seq, Py_NewRef(seq));
    Py_XSETREF(self->method, Py_NewRef(method));
    Py_XSETREF(self->metadata, Py_NewRef(metadata));
    Py_XSETREF(self->payload, Py_NewRef(payload));
    Py_XSETREF(self->codec, codec);
    Py_XSETREF(self->flags, flags);
    return 0;
}

static int
Frame_traverse(FrameObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->kind);
    Py_VISIT(self->seq);
    Py_VISIT(self->method);
    Py_VISIT(self->metadata);
    Py_VISIT(self->payload);
    Py_VISIT(self->codec);
    Py_VISIT(self->flags);
    return 0;
}

static int
Frame_clear(FrameObject *self)
{
    Py_CLEAR(self->kind);
    Py_CLEAR(self->seq);
    Py_CLEAR(self->method);
    Py_CLEAR(self->metadata);
    Py_CLEAR(self->payload);
    Py_CLEAR(self->codec);
    Py_CLEAR(self->flags);
    return 0;
}

static void
Frame_dealloc(FrameObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, Frame_dealloc);
    Frame_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_TRASHCAN_END;
}

static PyObject *
Frame_repr(PyObject *self)
{
    PyObject *fn = py_helper("_frame_repr");
    if (fn == NULL)
        return NULL;
    PyObject *r = PyObject_CallOneArg(fn, self);
    Py_DECREF(fn);
    return r;
}

static PyObject *
Frame_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &FrameType) ||
        !PyObject_TypeCheck(a, &FrameType))
        Py_RETURN_NOTIMPLEMENTED;
    FrameObject *x = (FrameObject *)a, *y = (FrameObject *)b;
    PyObject *xs[7] = {x->codec, x->flags, x->kind, x->metadata, x->method, x->payload, x->seq};
    PyObject *ys[7] = {y->codec, y->flags, y->kind, y->metadata, y->method, y->payload, y->seq};
    static const char *names[7] = {"codec", "flags", "kind", "metadata", "method", "payload", "seq"};
    for (int i = 0; i < 7; i++) {
        if (xs[i] == NULL || ys[i] == NULL) {
            PyErr_Format(PyExc_AttributeError, "'Frame' object has no attribute '%s'", names[i]);
            return NULL;
        }
        int eq = PyObject_RichCompareBool(xs[i], ys[i], Py_EQ);
        if (eq < 0)
            return NULL;
        if (!eq)
            return Py_NewRef(op == Py_EQ ? Py_False : Py_True);
    }
    return Py_NewRef(op == Py_EQ ? Py_True : Py_False);
}

static PyObject *
Frame_reduce(FrameObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->kind || !self->seq || !self->method || !self->metadata || !self->payload ||
        !self->codec || !self->flags) {
        PyErr_SetString(PyExc_AttributeError, "cannot pickle a Frame with unset attributes");
        return NULL;
    }
    return Py_BuildValue("O(OOOOOOO)", Py_TYPE(self), self->kind, self->seq, self->method,
                         self->metadata, self->payload, self->codec, self->flags);
}

static PyMemberDef Frame_members[] = {
    {"kind", T_OBJECT_EX, offsetof(FrameObject, kind), 0, "frame kind (see Kind)"},
    {"seq", T_OBJECT_EX, offsetof(FrameObject, seq), 0, "sequence id of the exchange"},
    {"method", T_OBJECT_EX, offsetof(FrameObject, method), 0, "method name ('' if none)"},
    {"metadata", T_OBJECT_EX, offsetof(FrameObject, metadata), 0, "string map"},
    {"payload", T_OBJECT_EX, offsetof(FrameObject, payload), 0, "payload, still encoded"},
    {"codec", T_OBJECT_EX, offsetof(FrameObject, codec), 0, "payload codec id"},
    {"flags", T_OBJECT_EX, offsetof(FrameObject, flags), 0, "flag bits"},
    {NULL},
};

static PyMethodDef Frame_methods[] = {
    {"__reduce__", (PyCFunction)Frame_reduce, METH_NOARGS, "Pickle support."},
    {NULL},
};

static PyTypeObject FrameType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polyrpc.wire._frames.Frame",
    .tp_doc = "Frame(kind, seq, method='', metadata={}, payload=b'', codec=0, flags=0)\n--\n\n"
              "One decoded frame; ``payload`` is still encoded (see ``codec``).",
    .tp_basicsize = sizeof(FrameObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Frame_init,
    .tp_dealloc = (destructor)Frame_dealloc,
    .tp_traverse = (traverseproc)Frame_traverse,
    .tp_clear = (inquiry)Frame_clear,
    .tp_repr = Frame_repr,
    .tp_richcompare = Frame_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_members = Frame_members,
    .tp_methods = Frame_methods,
};

/* ============================================================== FrameDecoder */


/* get_buffer returns memoryview(window): the window's buffer export forwards to the
 * bytearray being filled (so the view holds a real export of it and blocks resizing),
 * offset to its free tail. One memoryview instead of a view plus a slice. */
struct WindowObject {
    PyObject_HEAD
    DecoderObject *decoder; /* borrowed; cleared when the decoder goes away */
};

static int
Window_getbuffer(WindowObject *self, Py_buffer *view, int flags)
{
    DecoderObject *d = self->decoder;
    if (d == NULL || d->buf == NULL) {
        PyErr_SetString(PyExc_BufferError, "the frame decoder is gone");
        return -1;
    }
    if (d->large != NULL) /* writable: nothing else refers to the unfinished payload */
        return PyBuffer_FillInfo(view, d->large, PyBytes_AS_STRING(d->large) + d->large_filled,
                                 PyBytes_GET_SIZE(d->large) - d->large_filled, 0, flags);
    Py_ssize_t offset = d->end;
    if (PyObject_GetBuffer(d->buf, view, flags) < 0)
        return -1;
    if (offset > view->len)
        offset = view->len;
    view->buf = (char *)view->buf + offset;
    view->len -= offset; /* view->shape, if requested, points at view->len */
    return 0;
}

static PyBufferProcs Window_as_buffer = {
    .bf_getbuffer = (getbufferproc)Window_getbuffer,
};

static PyTypeObject WindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polyrpc.wire._frames._Window",
    .tp_doc = "Internal: the decoder's writable tail, exported for get_buffer().",
    .tp_basicsize = sizeof(WindowObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_as_buffer = &Window_as_buffer,
};

static PyTypeObject DecoderType;

/* Clamp a limit to int64 (Python compares unbounded ints; no header value reaches 2**63). */
static int
read_limit(PyObject *limits, const char *name, int64_t *out)
{
    PyObject *v = PyObject_GetAttrString(limits, name);
    if (v == NULL)
        return -1;
    PyObject *i = PyNumber_Index(v);
    Py_DECREF(v);
    if (i == NULL)
        return -1;
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (n == -1 && PyErr_Occurred())
        return -1;
    *out = overflow > 0 ? INT64_MAX : overflow < 0 ? INT64_MIN : (int64_t)n;
    return 0;
}

/* Take ``limits``; the frame limit follows limits.max_frame, or max_handshake_frame while
 * in handshake mode (only set_max_frame changes it then). */
static int
decoder_set_limits(DecoderObject *d, PyObject *limits, int initial)
{
    int64_t mf, mm, mt, hf;
    const char *frame_name = "max_frame";
    int take_frame = initial || !d->handshaking;
    if ((take_frame && read_limit(limits, frame_name, &mf) < 0) ||
        read_limit(limits, "max_metadata", &mm) < 0 || read_limit(limits, "max_method", &mt) < 0)
        return -1;
    if (take_frame && d->handshaking) { /* the handshake limit, or max_frame if smaller */
        if (read_limit(limits, "max_handshake_frame", &hf) < 0)
            return -1;
        if (hf < mf) {
            mf = hf;
            frame_name = "max_handshake_frame";
        }
    }
    if (take_frame) {
        PyObject *obj = PyObject_GetAttrString(limits, frame_name);
        if (obj == NULL)
            return -1;
        Py_XSETREF(d->max_frame_obj, obj);
        d->max_frame = mf;
    }
    d->max_metadata = mm;
    d->max_method = mt;
    Py_XSETREF(d->limits, Py_NewRef(limits));
    return 0;
}

/* A bytearray of n zero bytes. */
static PyObject *
zeroed_bytearray(Py_ssize_t n)
{
    PyObject *b = PyByteArray_FromStringAndSize(NULL, n);
    if (b != NULL && n)
        memset(PyByteArray_AS_STRING(b), 0, (size_t)n);
    return b;
}

static PyObject *
Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    DecoderObject *d = (DecoderObject *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    d->window = PyObject_New(WindowObject, &WindowType);
    if (d->window == NULL) {
        Py_DECREF(d);
        return NULL;
    }
    d->window->decoder = d;
    return (PyObject *)d;
}

static int
Decoder_init(DecoderObject *d, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limits", "handshake", NULL};
    PyObject *limits = Py_None;
    int handshake = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O$p:FrameDecoder", kwlist, &limits,
                                     &handshake))
        return -1;
    d->handshaking = (char)handshake;
    d->after_hello = 0;
    PyObject *own_limits;
    if (limits == Py_None || !PyObject_IsTrue(limits)) { /* ``limits or Limits()`` */
        if (PyErr_Occurred())
            return -1;
        PyObject *cls = py_helper("Limits");
        if (cls == NULL)
            return -1;
        own_limits = PyObject_CallNoArgs(cls);
        Py_DECREF(cls);
        if (own_limits == NULL)
            return -1;
    }
    else {
        own_limits = Py_NewRef(limits);
    }
    int rc = decoder_set_limits(d, own_limits, 1);
    Py_DECREF(own_limits);
    if (rc < 0)
        return -1;
    PyObject *buf = zeroed_bytearray(INITIAL_BUFFER);
    if (buf == NULL)
        return -1;
    PyObject *methods = PyDict_New();
    if (methods == NULL) {
        Py_DECREF(buf);
        return -1;
    }
    Py_XSETREF(d->buf, buf);
    Py_XSETREF(d->methods, methods);
    d->start = d->end = d->offered = d->want = 0;
    d->grow = 0;
    Py_CLEAR(d->large);
    d->large_filled = d->large_size = 0;
    Py_CLEAR(d->large_frame);
    Py_CLEAR(d->last_raw);
    Py_CLEAR(d->last_method);
    Py_CLEAR(d->broken);
    return 0;
}

static int
Decoder_traverse(DecoderObject *d, visitproc visit, void *arg)
{
    Py_VISIT(d->limits);
    Py_VISIT(d->max_frame_obj);
    Py_VISIT(d->buf);
    Py_VISIT(d->large);
    Py_VISIT(d->large_frame);
    Py_VISIT(d->methods);
    Py_VISIT(d->last_raw);
    Py_VISIT(d->last_method);
    Py_VISIT(d->broken);
    return 0;
}

static int
Decoder_clear(DecoderObject *d)
{
    Py_CLEAR(d->limits);
    Py_CLEAR(d->max_frame_obj);
    Py_CLEAR(d->buf);
    Py_CLEAR(d->large);
    Py_CLEAR(d->large_frame);
    Py_CLEAR(d->methods);
    Py_CLEAR(d->last_raw);
    Py_CLEAR(d->last_method);
    Py_CLEAR(d->broken);
    return 0;
}

static void
Decoder_dealloc(DecoderObject *d)
{
    PyObject_GC_UnTrack(d);
    Decoder_clear(d);
    if (d->window != NULL) {
        d->window->decoder = NULL;
        Py_CLEAR(d->window);
    }
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* Record and raise ProtocolError(message); consumes ``message``. Always returns -1. */
static int
decoder_fail(DecoderObject *d, PyObject *message)
{
    if (message == NULL)
        return -1;
    PyObject *exc = PyObject_CallOneArg(ProtocolError, message);
    Py_DECREF(message);
    if (exc == NULL)
        return -1;
    Py_XSETREF(d->broken, exc);
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    return -1;
}

/* The peer is not speaking polyrpc: fail with frames.describe_garbage's hint. */
static int
decoder_fail_garbage(DecoderObject *d, const char *data, Py_ssize_t n)
{
    PyObject *fn = py_helper("describe_garbage");
    if (fn == NULL)
        return -1;
    PyObject *raw = PyBytes_FromStringAndSize(data, n);
    if (raw == NULL) {
        Py_DECREF(fn);
        return -1;
    }
    PyObject *message = PyObject_CallOneArg(fn, raw);
    Py_DECREF(fn);
    Py_DECREF(raw);
    return decoder_fail(d, message);
}

/* "<what> of N bytes exceeds <limits.name>" with the limit printed as Python would. */
static int
decoder_fail_limit(DecoderObject *d, const char *fmt, unsigned long long n, const char *name)
{
    PyObject *limit = PyObject_GetAttrString(d->limits, name);
    if (limit == NULL)
        return -1;
    PyObject *message = PyUnicode_FromFormat(fmt, n, limit);
    Py_DECREF(limit);
    return decoder_fail(d, message);
}

/* Ensure ``needed`` free bytes after end: compact first, grow (zero-filled) if still short
 * (into a new buffer if a caller still holds a view of this one). */
static int
decoder_make_room(DecoderObject *d, Py_ssize_t needed)
{
    Py_ssize_t used = d->end - d->start;
    if (d->start) {
        char *p = PyByteArray_AS_STRING(d->buf);
        memmove(p, p + d->start, (size_t)used);
        d->start = 0;
        d->end = used;
    }
    Py_ssize_t size = PyByteArray_GET_SIZE(d->buf);
    if (size - used < needed) {
        if (needed > PY_SSIZE_T_MAX - used) {
            PyErr_NoMemory();
            return -1;
        }
        if (((PyByteArrayObject *)d->buf)->ob_exports > 0) {
            /* a view from an earlier get_buffer() is alive: move to a new buffer */
            PyObject *grown = zeroed_bytearray(used + needed);
            if (grown == NULL)
                return -1;
            memcpy(PyByteArray_AS_STRING(grown), PyByteArray_AS_STRING(d->buf), (size_t)used);
            Py_SETREF(d->buf, grown);
            return 0;
        }
        if (PyByteArray_Resize(d->buf, used + needed) < 0)
            return -1;
        memset(PyByteArray_AS_STRING(d->buf) + size, 0, (size_t)(used + needed - size));
    }
    return 0;
}

/* The method name for raw bytes, through the cache (new reference). */
static PyObject *
decoder_method(DecoderObject *d, const char *p, Py_ssize_t n)
{
    if (d->last_raw != NULL && PyBytes_GET_SIZE(d->last_raw) == n &&
        memcmp(PyBytes_AS_STRING(d->last_raw), p, (size_t)n) == 0)
        return Py_NewRef(d->last_method);
    PyObject *raw = PyBytes_FromStringAndSize(p, n);
    if (raw == NULL)
        return NULL;
    PyObject *method = PyDict_GetItemWithError(d->methods, raw);
    if (method != NULL) {
        Py_INCREF(method);
    }
    else {
        if (PyErr_Occurred()) {
            Py_DECREF(raw);
            return NULL;
        }
        method = PyUnicode_DecodeUTF8(p, n, NULL);
        if (method == NULL) {
            Py_DECREF(raw);
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                return NULL;
            PyErr_Clear();
            decoder_fail(d, PyUnicode_FromString("method name is not valid UTF-8"));
            return NULL;
        }
        if (PyDict_GET_SIZE(d->methods) < CACHE_MAX &&
            PyDict_SetItem(d->methods, raw, method) < 0) {
            Py_DECREF(raw);
            Py_DECREF(method);
            return NULL;
        }
    }
    Py_XSETREF(d->last_raw, raw);
    Py_XSETREF(d->last_method, Py_NewRef(method));
    return method;
}

/* Parse a well-formed metadata block into a new dict. Returns NULL with no exception
 * set when the block is malformed (the caller asks the Python reference for the error). */
static PyObject *
metadata_fast(const unsigned char *p, Py_ssize_t n)
{
    PyObject *result = PyDict_New();
    if (result == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    while (pos < n) {
        if (n - pos < 2)
            goto malformed;
        Py_ssize_t klen = rd16(p + pos);
        pos += 2;
        if (n - pos < klen)
            goto malformed;
        const unsigned char *key_at = p + pos;
        pos += klen;
        if (n - pos < 4)
            goto malformed;
        Py_ssize_t vlen = (Py_ssize_t)rd32(p + pos);
        pos += 4;
        if (n - pos < vlen)
            goto malformed;
        PyObject *key = PyUnicode_DecodeUTF8((const char *)key_at, klen, NULL);
        if (key == NULL)
            goto decode_error;
        PyObject *value = PyUnicode_DecodeUTF8((const char *)p + pos, vlen, NULL);
        if (value == NULL) {
            Py_DECREF(key);
            goto decode_error;
        }
        pos += vlen;
        int rc = PyDict_SetItem(result, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) {
            Py_DECREF(result);
            return NULL;
        }
    }
    return result;
decode_error:
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        Py_DECREF(result);
        return NULL;
    }
    PyErr_Clear();
malformed:
    Py_DECREF(result);
    return NULL;
}

/* Metadata as a dict (new reference); a malformed block breaks the decoder with the
 * Python reference's exact message. */
static PyObject *
decoder_metadata(DecoderObject *d, const unsigned char *p, Py_ssize_t n)
{
    PyObject *result = metadata_fast(p, n);
    if (result != NULL || PyErr_Occurred())
        return result;
    PyObject *fn = py_helper("decode_metadata");
    if (fn == NULL)
        return NULL;
    PyObject *raw = PyBytes_FromStringAndSize((const char *)p, n);
    if (raw == NULL) {
        Py_DECREF(fn);
        return NULL;
    }
    result = PyObject_CallOneArg(fn, raw);
    Py_DECREF(fn);
    Py_DECREF(raw);
    if (result == NULL && PyErr_ExceptionMatches(ProtocolError)) {
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *value = PyErr_GetRaisedException();
#else
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
#endif
        PyObject *message = value != NULL ? PyObject_Str(value) : NULL;
        Py_XDECREF(value);
        decoder_fail(d, message); /* the reference's message, on this decoder's error */
    }
    return result;
}

/* A frame with method and metadata decoded and an empty payload (new reference). */
static PyObject *
decoder_build(DecoderObject *d, const unsigned char *h, Py_ssize_t mlen, Py_ssize_t metalen)
{
    /* header fields first: the error paths below may run Python code */
    unsigned char kind = h[3], codec = h[4], flags = h[5];
    uint64_t seq_value = rd64(h + 8);
    PyObject *method, *metadata;
    if (mlen) {
        method = decoder_method(d, (const char *)h + HEADER_SIZE, mlen);
        if (method == NULL)
            return NULL;
    }
    else {
        method = Py_NewRef(empty_str);
    }
    if (metalen) {
        metadata = decoder_metadata(d, h + HEADER_SIZE + mlen, metalen);
        if (metadata == NULL) {
            Py_DECREF(method);
            return NULL;
        }
    }
    else {
        metadata = Py_NewRef(empty_metadata);
    }
    PyObject *seq = PyLong_FromUnsignedLongLong(seq_value);
    if (seq == NULL) {
        Py_DECREF(method);
        Py_DECREF(metadata);
        return NULL;
    }
    /* ints below 256 are preallocated: PyLong_FromLong cannot fail for them */
    return frame_make(PyLong_FromLong(kind), seq, method, metadata, Py_NewRef(empty_bytes),
                      PyLong_FromLong(codec), PyLong_FromLong(flags));
}

/* Switch to reading a big payload into its own buffer, keeping what already arrived. */
static int
decoder_begin_large(DecoderObject *d, Py_ssize_t mlen, Py_ssize_t metalen, Py_ssize_t plen)
{
    const unsigned char *h = (const unsigned char *)PyByteArray_AS_STRING(d->buf) + d->start;
    PyObject *frame = decoder_build(d, h, mlen, metalen);
    if (frame == NULL)
        return -1;
    Py_ssize_t begin = d->start + HEADER_SIZE + mlen + metalen;
    Py_ssize_t have = d->end - begin;
    /* The payload is read straight into the bytes object it will be: it is handed out only
     * once full, so filling it in place is safe and saves a copy per big payload. It starts
     * small and grows (realloc, no copy for big blocks) as it fills, so a header alone
     * cannot make us allocate the size it announces. */
    Py_ssize_t size = 2 * have > LARGE_STEP ? 2 * have : LARGE_STEP;
    PyObject *large = PyBytes_FromStringAndSize(NULL, size < plen ? size : plen);
    if (large == NULL) {
        Py_DECREF(frame);
        return -1;
    }
    memcpy(PyBytes_AS_STRING(large), PyByteArray_AS_STRING(d->buf) + begin, (size_t)have);
    d->start = d->end = d->want = 0;
    d->grow = 0;
    Py_XSETREF(d->large, large);
    d->large_filled = have;
    d->large_size = plen;
    Py_XSETREF(d->large_frame, frame);
    return 0;
}

/* The big payload's buffer is full but the payload is not: double it (up to its size). */
static int
decoder_grow_large(DecoderObject *d)
{
    Py_ssize_t size = PyBytes_GET_SIZE(d->large);
    Py_ssize_t want = size <= d->large_size / 2 ? 2 * size : d->large_size;
    if (Py_REFCNT(d->large) != 1) { /* a view of it is still alive: grow into a copy */
        PyObject *grown = PyBytes_FromStringAndSize(NULL, want);
        if (grown == NULL)
            return -1;
        memcpy(PyBytes_AS_STRING(grown), PyBytes_AS_STRING(d->large), (size_t)size);
        Py_SETREF(d->large, grown);
        return 0;
    }
    PyObject *large = d->large;
    d->large = NULL;
    if (_PyBytes_Resize(&large, want) < 0) { /* the payload is lost: the decoder is broken */
        PyErr_Clear();
        Py_CLEAR(d->large_frame);
        return decoder_fail(d, PyUnicode_FromFormat("no memory for a payload of %zd bytes",
                                                    d->large_size));
    }
    d->large = large;
    return 0;
}

/* Parse every complete frame in buf[start:end], appending to ``out``. */
static int
decoder_parse(DecoderObject *d, PyObject *out)
{
    if (d->broken != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(d->broken), d->broken);
        return -1;
    }
    if (d->after_hello)
        return 0;
    for (;;) {
        Py_ssize_t start = d->start, avail = d->end - start;
        const unsigned char *h = (const unsigned char *)PyByteArray_AS_STRING(d->buf) + start;
        if (avail < HEADER_SIZE) {
            if (avail >= 2 && (h[0] != 'P' || h[1] != 'R'))
                return decoder_fail_garbage(d, (const char *)h, avail);
            d->want = 0;
            break;
        }
        if (h[0] != 'P' || h[1] != 'R')
            return decoder_fail_garbage(d, (const char *)h, HEADER_SIZE);
        unsigned int version = h[2], kind = h[3];
        Py_ssize_t mlen = rd16(h + 6);
        Py_ssize_t metalen = (Py_ssize_t)rd32(h + 16);
        Py_ssize_t plen = (Py_ssize_t)rd32(h + 20);
        if (version != FRAME_VERSION)
            return decoder_fail(d, PyUnicode_FromFormat(
                                       "unsupported polyrpc frame version %u (this is %d)",
                                       version, FRAME_VERSION));
        if (kind < KIND_MIN || kind > KIND_MAX)
            return decoder_fail(d, PyUnicode_FromFormat("unknown frame kind %u", kind));
        if (mlen > d->max_method)
            return decoder_fail_limit(d, "method name of %llu bytes exceeds %S",
                                      (unsigned long long)mlen, "max_method");
        if (metalen > d->max_metadata)
            return decoder_fail_limit(d, "metadata of %llu bytes exceeds %S",
                                      (unsigned long long)metalen, "max_metadata");
        int64_t total = (int64_t)HEADER_SIZE + mlen + metalen + plen; /* < 2**34 */
        if (total > d->max_frame)
            return decoder_fail(d, PyUnicode_FromFormat(
                                       "frame of %llu bytes exceeds the limit of %S%s",
                                       (unsigned long long)total, d->max_frame_obj,
                                       d->handshaking ? " before the handshake" : ""));
        Py_ssize_t prefix = HEADER_SIZE + mlen + metalen;
        if (avail < total) {
            if (plen >= LARGE_PAYLOAD && avail >= prefix) {
                if (decoder_begin_large(d, mlen, metalen, plen) < 0)
                    return -1;
                break;
            }
            /* a big payload gets its own buffer: only its prefix is staged here; the next
             * get_buffer makes room (resizing fails while the caller holds its last view) */
            d->want = plen >= LARGE_PAYLOAD ? prefix : (Py_ssize_t)total;
            break;
        }
        PyObject *frame;
        if (mlen || metalen) {
            frame = decoder_build(d, h, mlen, metalen);
            if (frame == NULL)
                return -1;
            /* decoder_build may have run Python code; re-derive the pointer */
            h = (const unsigned char *)PyByteArray_AS_STRING(d->buf) + start;
            PyObject *payload = PyBytes_FromStringAndSize((const char *)h + prefix, plen);
            if (payload == NULL) {
                Py_DECREF(frame);
                return -1;
            }
            Py_SETREF(((FrameObject *)frame)->payload, payload);
        }
        else {
            PyObject *seq = PyLong_FromUnsignedLongLong(rd64(h + 8));
            if (seq == NULL)
                return -1;
            PyObject *payload = PyBytes_FromStringAndSize((const char *)h + prefix, plen);
            if (payload == NULL) {
                Py_DECREF(seq);
                return -1;
            }
            frame = frame_make(PyLong_FromLong(kind), seq, Py_NewRef(empty_str),
                               Py_NewRef(empty_metadata), payload, PyLong_FromLong(h[4]),
                               PyLong_FromLong(h[5]));
            if (frame == NULL)
                return -1;
        }
        int rc = PyList_Append(out, frame);
        Py_DECREF(frame);
        if (rc < 0)
            return -1;
        d->start = start + (Py_ssize_t)total;
        if (kind == KIND_HELLO && d->handshaking) {
            d->after_hello = 1; /* what follows waits for the limit set after it */
            d->want = 0;
            break;
        }
    }
    if (d->start == d->end)
        d->start = d->end = 0;
    return 0;
}

/* ``nbytes`` more bytes are in the current target; append completed frames to ``out``. */
static int
decoder_updated(DecoderObject *d, Py_ssize_t nbytes, PyObject *out)
{
    d->bytes_received += (unsigned long long)nbytes;
    if (d->large != NULL) {
        d->large_filled += nbytes;
        if (d->large_filled < d->large_size)
            return 0;
        PyObject *frame = d->large_frame;
        PyObject *large = d->large;
        d->large_frame = NULL;
        d->large = NULL;
        Py_SETREF(((FrameObject *)frame)->payload, large);
        int rc = PyList_Append(out, frame);
        Py_DECREF(frame);
        return rc;
    }
    if (nbytes && nbytes == d->offered && !d->handshaking)
        d->grow = 1;
    d->end += nbytes;
    return decoder_parse(d, out);
}

/* Room for the next read (as get_buffer); returns the free byte count or -1. */
static Py_ssize_t
decoder_prepare(DecoderObject *d)
{
    if (d->large != NULL) {
        if (d->large_filled == PyBytes_GET_SIZE(d->large) && decoder_grow_large(d) < 0)
            return -1;
        return PyBytes_GET_SIZE(d->large) - d->large_filled;
    }
    if (d->grow) { /* the last read filled what was offered: read more at a time */
        d->grow = 0;
        Py_ssize_t size = PyByteArray_GET_SIZE(d->buf);
        if (size < MAX_BUFFER &&
            decoder_make_room(d, (2 * size < MAX_BUFFER ? 2 * size : MAX_BUFFER) - d->end +
                                     d->start) < 0)
            return -1;
    }
    Py_ssize_t needed = d->want - (d->end - d->start);
    if (needed < MIN_READ)
        needed = MIN_READ;
    if (PyByteArray_GET_SIZE(d->buf) - d->end < needed && decoder_make_room(d, needed) < 0)
        return -1;
    d->offered = PyByteArray_GET_SIZE(d->buf) - d->end;
    return d->offered;
}

static int
decoder_ready(DecoderObject *d)
{
    if (d->buf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FrameDecoder.__init__ was not called");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(get_buffer_doc,
             "get_buffer(sizehint=-1)\n--\n\n"
             "Writable space for the next read (the large payload's own buffer when in one).");

static PyObject *
Decoder_get_buffer(DecoderObject *d, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t given = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    if (given > 1 || (kwnames && PyTuple_GET_SIZE(kwnames) &&
                      PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "sizehint"))) {
        PyErr_SetString(PyExc_TypeError, "get_buffer() takes one optional argument: sizehint");
        return NULL;
    }
    if (decoder_ready(d) < 0 || decoder_prepare(d) < 0)
        return NULL;
    return PyMemoryView_FromObject((PyObject *)d->window);
}

PyDoc_STRVAR(buffer_updated_doc,
             "buffer_updated(nbytes)\n--\n\n"
             "``nbytes`` were written into the last get_buffer(); return complete frames.");

/* The frames completed by ``arg`` bytes written into the last get_buffer() (new list). */
static PyObject *
decoder_filled(DecoderObject *d, PyObject *arg, const char *name)
{
    if (decoder_ready(d) < 0)
        return NULL;
    Py_ssize_t nbytes = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (nbytes == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t room = d->large != NULL ? PyBytes_GET_SIZE(d->large) - d->large_filled
                                       : PyByteArray_GET_SIZE(d->buf) - d->end;
    if (nbytes < 0 || nbytes > room) {
        PyErr_Format(PyExc_ValueError, "%s(%zd): get_buffer() offered %zd bytes", name, nbytes,
                     room);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (decoder_updated(d, nbytes, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
Decoder_buffer_updated(DecoderObject *d, PyObject *arg)
{
    return decoder_filled(d, arg, "buffer_updated");
}

PyDoc_STRVAR(feed_doc, "feed(data)\n--\n\nAdd received bytes; return the frames they complete.");

static PyObject *
Decoder_feed(DecoderObject *d, PyObject *data)
{
    if (decoder_ready(d) < 0)
        return NULL;
    Py_buffer in;
    if (PyObject_GetBuffer(data, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto fail;
    const char *src = in.buf;
    Py_ssize_t left = in.len;
    if (left > 0 && d->broken != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(d->broken), d->broken);
        goto fail;
    }
    while (left > 0) {
        Py_ssize_t room = decoder_prepare(d);
        if (room < 0)
            goto fail;
        Py_ssize_t n = room < left ? room : left;
        char *dst = d->large != NULL ? PyBytes_AS_STRING(d->large) + d->large_filled
                                     : PyByteArray_AS_STRING(d->buf) + d->end;
        memmove(dst, src, (size_t)n); /* data may be a view of our own buffer */
        src += n;
        left -= n;
        if (decoder_updated(d, n, out) < 0)
            goto fail;
    }
    PyBuffer_Release(&in);
    return out;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&in);
    return NULL;
}

static PyObject *
Decoder_get_pending_bytes(DecoderObject *d, void *closure)
{
    if (decoder_ready(d) < 0)
        return NULL;
    if (d->large != NULL)
        return PyLong_FromSsize_t(HEADER_SIZE + d->large_filled);
    return PyLong_FromSsize_t(d->end - d->start);
}

static PyObject *
Decoder_get_bytes_received(DecoderObject *d, void *closure)
{
    return PyLong_FromUnsignedLongLong(d->bytes_received);
}

static PyObject *
Decoder_get_limits(DecoderObject *d, void *closure)
{
    if (decoder_ready(d) < 0)
        return NULL;
    return Py_NewRef(d->limits);
}

static int
Decoder_set_limits(DecoderObject *d, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete limits");
        return -1;
    }
    return decoder_set_limits(d, value, 0);
}

static PyObject *
Decoder_get_max_frame(DecoderObject *d, void *closure)
{
    if (decoder_ready(d) < 0)
        return NULL;
    return Py_NewRef(d->max_frame_obj);
}

PyDoc_STRVAR(set_max_frame_doc,
             "set_max_frame(limit)\n--\n\n"
             "End handshake mode: accept frames of up to ``limit`` bytes from now on.");

static PyObject *
Decoder_set_max_frame(DecoderObject *d, PyObject *arg)
{
    if (decoder_ready(d) < 0)
        return NULL;
    PyObject *limit = PyNumber_Index(arg);
    if (limit == NULL)
        return NULL;
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(limit, &overflow);
    if (n == -1 && PyErr_Occurred()) {
        Py_DECREF(limit);
        return NULL;
    }
    if (overflow || n < HEADER_SIZE) {
        PyErr_Format(PyExc_ValueError, "max_frame must be at least %d bytes, got %S",
                     HEADER_SIZE, limit);
        Py_DECREF(limit);
        return NULL;
    }
    Py_XSETREF(d->max_frame_obj, limit);
    d->max_frame = (int64_t)n;
    d->handshaking = d->after_hello = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(trim_doc,
             "trim()\n--\n\n"
             "Give back a grown small-frame buffer while no frame is pending (call when idle).");

static PyObject *
Decoder_trim(DecoderObject *d, PyObject *Py_UNUSED(ignored))
{
    if (decoder_ready(d) < 0)
        return NULL;
    if (d->large == NULL && d->start == d->end && PyByteArray_GET_SIZE(d->buf) > INITIAL_BUFFER) {
        PyObject *buf = zeroed_bytearray(INITIAL_BUFFER);
        if (buf == NULL)
            return NULL;
        Py_SETREF(d->buf, buf); /* a view of the old one keeps it alive, unused */
        d->start = d->end = 0;
    }
    d->grow = 0;
    Py_RETURN_NONE;
}

static PyObject *
Decoder_get_broken(DecoderObject *d, void *closure)
{
    return Py_NewRef(d->broken != NULL ? d->broken : Py_None);
}

static int
Decoder_set_broken(DecoderObject *d, PyObject *value, void *closure)
{
    if (value != NULL && value != Py_None && !PyExceptionInstance_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "broken must be an exception or None");
        return -1;
    }
    Py_XSETREF(d->broken, value == Py_None ? NULL : Py_XNewRef(value));
    return 0;
}

static PyObject *
Decoder_get_buf(DecoderObject *d, void *closure)
{
    if (decoder_ready(d) < 0)
        return NULL;
    return Py_NewRef(d->buf);
}

static PyGetSetDef Decoder_getset[] = {
    {"pending_bytes", (getter)Decoder_get_pending_bytes, NULL,
     "Bytes of an incomplete frame held (non-zero at EOF means a truncated frame).", NULL},
    {"bytes_received", (getter)Decoder_get_bytes_received, NULL,
     "Bytes given to this decoder so far (read into get_buffer() or fed).", NULL},
    {"limits", (getter)Decoder_get_limits, (setter)Decoder_set_limits,
     "The Limits checked against every header.", NULL},
    {"max_frame", (getter)Decoder_get_max_frame, NULL,
     "The largest frame accepted now (the handshake limit until set_max_frame).", NULL},
    {"broken", (getter)Decoder_get_broken, (setter)Decoder_set_broken,
     "The ProtocolError that broke this decoder, or None.", NULL},
    {"_buf", (getter)Decoder_get_buf, NULL, "The small-frame buffer (for tests).", NULL},
    {NULL},
};

static PyMethodDef Decoder_methods[] = {
    {"get_buffer", (PyCFunction)(void (*)(void))Decoder_get_buffer,
     METH_FASTCALL | METH_KEYWORDS, get_buffer_doc},
    {"buffer_updated", (PyCFunction)Decoder_buffer_updated, METH_O, buffer_updated_doc},
    {"feed", (PyCFunction)Decoder_feed, METH_O, feed_doc},
    {"set_max_frame", (PyCFunction)Decoder_set_max_frame, METH_O, set_max_frame_doc},
    {"trim", (PyCFunction)Decoder_trim, METH_NOARGS, trim_doc},
    {NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polyrpc.wire._frames.FrameDecoder",
    .tp_doc = "FrameDecoder(limits=None, *, handshake=False)\n--\n\n"
              "Incremental frame parser. Feed bytes (or let a socket fill get_buffer()).\n\n"
              "Both entry points return the frames completed so far; a violation raises\n"
              "ProtocolError and leaves the decoder broken (the connection must close).\n\n"
              "With handshake=True no frame larger than limits.max_handshake_frame is\n"
              "accepted, reads do not grow the buffer, and decoding stops after a HELLO:\n"
              "the bytes after it are kept until set_max_frame() ends the mode (then\n"
              "buffer_updated(0) decodes them).",
    .tp_basicsize = sizeof(DecoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Decoder_new,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_traverse = (traverseproc)Decoder_traverse,
    .tp_clear = (inquiry)Decoder_clear,
    .tp_methods = Decoder_methods,
    .tp_getset = Decoder_getset,
};

/* ================================================================== encoders */

/* Hand the call to the pure-Python reference (unusual arguments, and their errors). */
static PyObject *
delegate(const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *fn = py_helper(name);
    if (fn == NULL)
        return NULL;
    PyObject *r = PyObject_Vectorcall(fn, args, (size_t)nargs, kwnames);
    Py_DECREF(fn);
    return r;
}

/* A header byte from an int in 0..255; -1 (no exception) when it is anything else. */
static int
as_u8(PyObject *o)
{
    if (!PyLong_Check(o))
        return -1;
    int overflow;
    long v = PyLong_AsLongAndOverflow(o, &overflow);
    if (overflow || v < 0 || v > 255)
        return -1;
    return (int)v;
}

static int
as_u64(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = v;
    return 0;
}

/* The payload's bytes and its len(); 1 when usable, 0 to delegate, -1 on error.
 * view->obj is NULL for exact bytes (no buffer to release). */
static int
payload_view(PyObject *payload, Py_buffer *view, Py_ssize_t *length)
{
    if (PyBytes_CheckExact(payload)) {
        view->obj = NULL;
        view->buf = PyBytes_AS_STRING(payload);
        view->len = PyBytes_GET_SIZE(payload);
        *length = view->len;
        return (uint64_t)view->len <= U32_MAX;
    }
    if (PyObject_GetBuffer(payload, view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        view->obj = NULL;
        return 0;
    }
    *length = PyObject_Length(payload);
    if (*length < 0) {
        PyErr_Clear();
        PyBuffer_Release(view);
        view->obj = NULL;
        return 0;
    }
    if (*length != view->len || (uint64_t)view->len > U32_MAX) {
        PyBuffer_Release(view);
        view->obj = NULL;
        return 0;
    }
    return 1;
}

static void
write_header(unsigned char *p, int kind, int codec, int flags, Py_ssize_t mlen, uint64_t seq,
             Py_ssize_t metalen, Py_ssize_t plen)
{
    p[0] = 'P';
    p[1] = 'R';
    p[2] = FRAME_VERSION;
    p[3] = (unsigned char)kind;
    p[4] = (unsigned char)codec;
    p[5] = (unsigned char)flags;
    wr16(p + 6, (uint16_t)mlen);
    wr64(p + 8, seq);
    wr32(p + 16, (uint32_t)metalen);
    wr32(p + 20, (uint32_t)plen);
}

/* [prefix, payload] for a large payload, else [prefix + payload]; the prefix is the
 * header followed by ``extra`` bytes (method and metadata) written by ``fill``. */
typedef int (*fill_fn)(unsigned char *dst, void *ctx);

static PyObject *
assemble(PyObject *payload, Py_buffer *pv, Py_ssize_t plen_field, int kind, int codec, int flags,
         uint64_t seq, Py_ssize_t mlen, Py_ssize_t metalen, fill_fn fill, void *ctx)
{
    Py_ssize_t prefix = HEADER_SIZE + mlen + metalen;
    int large = pv->len >= LARGE_PAYLOAD;
    PyObject *head = PyBytes_FromStringAndSize(NULL, prefix + (large ? 0 : pv->len));
    if (head == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(head);
    write_header(p, kind, codec, flags, mlen, seq, metalen, plen_field);
    if (fill != NULL && fill(p + HEADER_SIZE, ctx) < 0) {
        Py_DECREF(head);
        return NULL;
    }
    PyObject *list = PyList_New(large ? 2 : 1);
    if (list == NULL) {
        Py_DECREF(head);
        return NULL;
    }
    if (large) {
        PyList_SET_ITEM(list, 1, Py_NewRef(payload));
    }
    else if (pv->len) {
        memcpy(p + prefix, pv->buf, (size_t)pv->len);
    }
    PyList_SET_ITEM(list, 0, head);
    return list;
}

/* encode_plain's work once the arguments are known good; 0 from *ok means "delegate". */
static PyObject *
plain(PyObject *kind_o, PyObject *seq_o, PyObject *payload, PyObject *codec_o, PyObject *flags_o,
      int *ok)
{
    int kind = as_u8(kind_o), codec = codec_o ? as_u8(codec_o) : 0;
    int flags = flags_o ? as_u8(flags_o) : 0;
    uint64_t seq;
    *ok = 0;
    if (kind < 0 || codec < 0 || flags < 0 || as_u64(seq_o, &seq) < 0)
        return NULL;
    Py_buffer pv;
    Py_ssize_t plen;
    int usable = payload_view(payload, &pv, &plen);
    if (usable <= 0)
        return NULL;
    *ok = 1;
    PyObject *r = assemble(payload, &pv, plen, kind, codec, flags, seq, 0, 0, NULL, NULL);
    if (pv.obj != NULL)
        PyBuffer_Release(&pv);
    return r;
}

PyDoc_STRVAR(encode_plain_doc,
             "encode_plain(kind, seq, payload, codec=0, flags=0)\n--\n\n"
             "encode_frame() for the common frame with no method and no metadata (hot path).");

static PyObject *
encode_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames == NULL && nargs >= 3 && nargs <= 5) {
        int ok;
        PyObject *r = plain(args[0], args[1], args[2], nargs > 3 ? args[3] : NULL,
                            nargs > 4 ? args[4] : NULL, &ok);
        if (ok)
            return r;
    }
    return delegate("_py_encode_plain", args, nargs, kwnames);
}

/* Metadata entries collected before writing: UTF-8 views into the str objects. */
typedef struct {
    PyObject *dict;
    Py_ssize_t method_len;
    const char *method;
} MetaCtx;

/* Bytes the metadata block needs; -1 (no exception) to delegate; -2 on error. */
static Py_ssize_t
metadata_size(PyObject *metadata)
{
    if (!PyDict_CheckExact(metadata))
        return -1;
    Py_ssize_t pos = 0, total = 0;
    PyObject *key, *value;
    while (PyDict_Next(metadata, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || !PyUnicode_CheckExact(value))
            return -1;
        Py_ssize_t klen, vlen;
        if (PyUnicode_AsUTF8AndSize(key, &klen) == NULL ||
            PyUnicode_AsUTF8AndSize(value, &vlen) == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return -2;
            PyErr_Clear();
            return -1;
        }
        if ((uint64_t)klen > U16_MAX || (uint64_t)vlen > U32_MAX)
            return -1;
        total += 6 + klen + vlen;
        if ((uint64_t)total > U32_MAX)
            return -1;
    }
    return total;
}

static int
fill_method_metadata(unsigned char *dst, void *arg)
{
    MetaCtx *ctx = arg;
    memcpy(dst, ctx->method, (size_t)ctx->method_len);
    dst += ctx->method_len;
    if (ctx->dict == NULL)
        return 0;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(ctx->dict, &pos, &key, &value)) {
        Py_ssize_t klen, vlen;
        const char *k = PyUnicode_AsUTF8AndSize(key, &klen); /* cached by metadata_size */
        const char *v = PyUnicode_AsUTF8AndSize(value, &vlen);
        if (k == NULL || v == NULL)
            return -1;
        wr16(dst, (uint16_t)klen);
        memcpy(dst + 2, k, (size_t)klen);
        wr32(dst + 2 + klen, (uint32_t)vlen);
        memcpy(dst + 6 + klen, v, (size_t)vlen);
        dst += 6 + klen + vlen;
    }
    return 0;
}

/* The UTF-8 bytes of a method name, cached like the Python encoder (new reference);
 * NULL with no exception set to delegate. */
static PyObject *
method_bytes(PyObject *method)
{
    PyObject *b = PyDict_GetItemWithError(method_bytes_cache, method);
    if (b != NULL)
        return Py_NewRef(b);
    if (PyErr_Occurred())
        return NULL;
    b = PyUnicode_AsUTF8String(method);
    if (b == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            PyErr_Clear();
        return NULL;
    }
    if (PyDict_GET_SIZE(method_bytes_cache) < CACHE_MAX &&
        PyDict_SetItem(method_bytes_cache, method, b) < 0) {
        Py_DECREF(b);
        return NULL;
    }
    return b;
}

PyDoc_STRVAR(encode_frame_doc,
             "encode_frame(kind, seq, payload=b'', *, method='', metadata=None, codec=0, "
             "flags=0)\n--\n\n"
             "The frame as buffers for a gather write: a prefix, and a large payload separately.");

static PyObject *
encode_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *method = empty_str, *metadata = Py_None, *codec = NULL, *flags = NULL;
    PyObject *payload = empty_bytes;
    if (nargs < 2 || nargs > 3)
        goto delegate;
    if (nargs == 3)
        payload = args[2];
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(name, "method") == 0)
                method = value;
            else if (PyUnicode_CompareWithASCIIString(name, "metadata") == 0)
                metadata = value;
            else if (PyUnicode_CompareWithASCIIString(name, "codec") == 0)
                codec = value;
            else if (PyUnicode_CompareWithASCIIString(name, "flags") == 0)
                flags = value;
            else if (nargs == 2 && PyUnicode_CompareWithASCIIString(name, "payload") == 0)
                payload = value;
            else
                goto delegate;
        }
    }
    if (!PyUnicode_CheckExact(method) || (metadata != Py_None && !PyDict_CheckExact(metadata)))
        goto delegate;
    int ok;
    if (PyUnicode_GET_LENGTH(method) == 0 && (metadata == Py_None || PyDict_GET_SIZE(metadata) == 0)) {
        PyObject *r = plain(args[0], args[1], payload, codec, flags, &ok);
        if (ok || PyErr_Occurred())
            return r;
        goto delegate;
    }
    int kind = as_u8(args[0]), codec_v = codec ? as_u8(codec) : 0, flags_v = flags ? as_u8(flags) : 0;
    uint64_t seq;
    if (kind < 0 || codec_v < 0 || flags_v < 0 || as_u64(args[1], &seq) < 0)
        goto delegate;
    PyObject *mbytes = method_bytes(method);
    if (mbytes == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto delegate;
    }
    MetaCtx ctx = {NULL, PyBytes_GET_SIZE(mbytes), PyBytes_AS_STRING(mbytes)};
    Py_ssize_t metalen = 0;
    if (metadata != Py_None && PyDict_GET_SIZE(metadata)) {
        metalen = metadata_size(metadata);
        if (metalen == -2) {
            Py_DECREF(mbytes);
            return NULL;
        }
        ctx.dict = metadata;
    }
    if (metalen < 0 || (uint64_t)ctx.method_len > U16_MAX) {
        Py_DECREF(mbytes);
        goto delegate;
    }
    Py_buffer pv;
    Py_ssize_t plen;
    int usable = payload_view(payload, &pv, &plen);
    if (usable <= 0) {
        Py_DECREF(mbytes);
        goto delegate;
    }
    PyObject *r = assemble(payload, &pv, plen, kind, codec_v, flags_v, seq, ctx.method_len, metalen,
                           fill_method_metadata, &ctx);
    if (pv.obj != NULL)
        PyBuffer_Release(&pv);
    Py_DECREF(mbytes);
    return r;
delegate:
    return delegate("_py_encode_frame", args, nargs, kwnames);
}

/* ============================================================ payload scans */
/* Reference: msgpack_counts and json_counts in polyrpc/wire/codecs.py. Both walk a payload
 * once without building any object and return the counts that codecs.container_bytes turns
 * into the bytes its arrays and maps would take, so an amplifying payload is refused before
 * it is decoded. A malformed or truncated item ends the walk (the decoder reports it). */

static inline uint32_t
be_read(const unsigned char *p, int n)
{
    uint32_t v = 0;
    for (int k = 0; k < n; k++)
        v = (v << 8) | p[k];
    return v;
}

PyDoc_STRVAR(msgpack_counts_doc,
             "msgpack_counts(data, /)\n--\n\n"
             "(arrays, array elements, maps, non-empty maps, map entries) in msgpack ``data``.");

static PyObject *
msgpack_counts(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len, i = 0;
    unsigned long long arrays = 0, elements = 0, maps = 0, nonempty = 0, entries = 0;
    while (i < n) {
        unsigned char b = p[i];
        Py_ssize_t rest = n - i - 1; /* bytes after the type byte */
        uint32_t len;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            i++;
        } else if (b <= 0x8f) {
            maps++, nonempty += (b & 0x0f) != 0, entries += b & 0x0f, i++;
        } else if (b <= 0x9f) {
            arrays++, elements += b & 0x0f, i++;
        } else if (b <= 0xbf) {
            i += 1 + (b & 0x1f);
        } else {
            int fixed = 0, lenbytes = 0, extra = 0, kind = 0; /* kind: 1 array, 2 map */
            switch (b) {
            case 0xcc: case 0xd0: fixed = 1; break;
            case 0xcd: case 0xd1: case 0xd4: fixed = 2; break;
            case 0xd5: fixed = 3; break;
            case 0xca: case 0xce: case 0xd2: fixed = 4; break;
            case 0xd6: fixed = 5; break;
            case 0xcb: case 0xcf: case 0xd3: fixed = 8; break;
            case 0xd7: fixed = 9; break;
            case 0xd8: fixed = 17; break;
            case 0xc4: case 0xd9: lenbytes = 1; break;
            case 0xc5: case 0xda: lenbytes = 2; break;
            case 0xc6: case 0xdb: lenbytes = 4; break;
            case 0xc7: lenbytes = 1, extra = 1; break;
            case 0xc8: lenbytes = 2, extra = 1; break;
            case 0xc9: lenbytes = 4, extra = 1; break;
            case 0xdc: lenbytes = 2, kind = 1; break;
            case 0xdd: lenbytes = 4, kind = 1; break;
            case 0xde: lenbytes = 2, kind = 2; break;
            case 0xdf: lenbytes = 4, kind = 2; break;
            default: goto done; /* 0xc1: never used */
            }
            if (fixed) {
                if (rest < fixed)
                    goto done;
                i += 1 + fixed;
                continue;
            }
            if (rest < lenbytes)
                goto done;
            len = be_read(p + i + 1, lenbytes);
            if (kind == 1)
                arrays++, elements += len, i += 1 + lenbytes;
            else if (kind == 2)
                maps++, nonempty += len != 0, entries += len, i += 1 + lenbytes;
            else
                i += 1 + lenbytes + extra + (Py_ssize_t)len; /* past the end: the walk ends */
        }
    }
done:
    PyBuffer_Release(&view);
    return Py_BuildValue("(KKKKK)", arrays, elements, maps, nonempty, entries);
}

PyDoc_STRVAR(json_counts_doc,
             "json_counts(data, /)\n--\n\n"
             "(\"[\", \"[]\", \"{\", \"{}\", \":\", \",\") outside strings in JSON ``data``, whitespace "
             "ignored.");

static PyObject *
json_counts(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    unsigned long long arrays = 0, empty_arrays = 0, maps = 0, empty_maps = 0, colons = 0, commas = 0;
    unsigned char prev = 0; /* the last byte outside strings and whitespace; '"' for a string */
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        switch (c) {
        case ' ': case '\t': case '\n': case '\r':
            continue;
        case '"': /* to the closing quote: the first one after an even run of backslashes */
            for (Py_ssize_t from = i + 1;;) {
                const unsigned char *quote = memchr(p + from, '"', (size_t)(n - from));
                if (quote == NULL) {
                    i = n; /* unterminated: the string runs to the end */
                    break;
                }
                Py_ssize_t at = quote - p, run = at;
                while (run > i + 1 && p[run - 1] == '\\')
                    run--;
                if (((at - run) & 1) == 0) {
                    i = at;
                    break;
                }
                from = at + 1;
            }
            break;
        case '[': arrays++; break;
        case '{': maps++; break;
        case ']': empty_arrays += prev == '['; break;
        case '}': empty_maps += prev == '{'; break;
        case ':': colons++; break;
        case ',': commas++; break;
        }
        prev = c;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(KKKKKK)", arrays, empty_arrays, maps, empty_maps, colons, commas);
}

/* ==================================================================== module */

static PyMethodDef module_methods[] = {
    {"encode_plain", (PyCFunction)(void (*)(void))encode_plain, METH_FASTCALL | METH_KEYWORDS,
     encode_plain_doc},
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL | METH_KEYWORDS,
     encode_frame_doc},
    {"msgpack_counts", (PyCFunction)msgpack_counts, METH_O, msgpack_counts_doc},
    {"json_counts", (PyCFunction)json_counts, METH_O, json_counts_doc},
    {NULL},
};

static struct PyModuleDef frames_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "polyrpc.wire._frames",
    .m_doc = "C implementation of polyrpc.wire.frames' codec (Frame, FrameDecoder, encoders).",
    .m_size = -1,
    .m_methods = module_methods,
};

/* What the other layers' C code uses of this one (see _frames.h). */

static PyObject *
api_encode_plain(PyObject *kind, PyObject *seq, PyObject *payload, int *ok)
{
    return plain(kind, seq, payload, NULL, NULL, ok);
}

static PyObject *
api_filled(PyObject *decoder, PyObject *nbytes, const char *name)
{
    return decoder_filled((DecoderObject *)decoder, nbytes, name);
}

static PyObject *
api_feed(PyObject *decoder, PyObject *data)
{
    return Decoder_feed((DecoderObject *)decoder, data);
}

static PolyrpcFramesCAPI frames_c_api = {
    .frame_type = &FrameType,
    .decoder_type = &DecoderType,
    .protocol_error = &ProtocolError,
    .encode_plain = api_encode_plain,
    .filled = api_filled,
    .feed = api_feed,
};

PyMODINIT_FUNC
PyInit__frames(void)
{
    if (PyType_Ready(&FrameType) < 0 || PyType_Ready(&WindowType) < 0 ||
        PyType_Ready(&DecoderType) < 0)
        return NULL;
    if (ProtocolError == NULL) {
        PyObject *errors = PyImport_ImportModule("polyrpc.errors");
        if (errors == NULL)
            return NULL;
        ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
        Py_DECREF(errors);
        if (ProtocolError == NULL)
            return NULL;
        empty_str = PyUnicode_FromStringAndSize("", 0);
        empty_bytes = PyBytes_FromStringAndSize("", 0);
        empty_metadata = PyDict_New();
        method_bytes_cache = PyDict_New();
        if (!empty_str || !empty_bytes || !empty_metadata || !method_bytes_cache)
            return NULL;
    }
    PyObject *m = PyModule_Create(&frames_moduledef);
    if (m == NULL)
        return NULL;
    PyObject *api = PyCapsule_New(&frames_c_api, POLYRPC_FRAMES_CAPSULE, NULL);
    int added = api ? PyModule_AddObjectRef(m, POLYRPC_FRAMES_CAPSULE_ATTR, api) : -1;
    Py_XDECREF(api);
    if (added < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Frame", (PyObject *)&FrameType) < 0 ||
        PyModule_AddObjectRef(m, "FrameDecoder", (PyObject *)&DecoderType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "VERSION", FRAME_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "LARGE_PAYLOAD", LARGE_PAYLOAD) < 0 ||
        PyModule_AddIntConstant(m, "INITIAL_BUFFER", INITIAL_BUFFER) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BUFFER", MAX_BUFFER) < 0 ||
        PyModule_AddIntConstant(m, "LARGE_STEP", LARGE_STEP) < 0 ||
        PyModule_AddIntConstant(m, "KIND_MIN", KIND_MIN) < 0 ||
        PyModule_AddIntConstant(m, "KIND_MAX", KIND_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
