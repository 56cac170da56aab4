/* polyrpc.session._routing: the session layer's C accelerator, a stand-in for one Python
 * path: RoutingDecoder (reference: polyrpc/session/routing.py), the frame decoder as the
 * session's receiving end. It extends the codec's C FrameDecoder (polyrpc/wire/_frames.h)
 * with route(), received() and received_data(): a reply that opens a batch resolves its
 * caller's future right here, a request that arrives alone goes to on_request with
 * serving_one set, everything else to the session's on_frames in order. It exports
 * serving_one to the RPC layer's call server through the capsule in _routing.h, with the
 * session's C base type SessionState (_state.c, compiled into this extension).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

#include "../wire/_frames.h"
#include "_routing.h"
#include "_state.h"

extern PyTypeObject SessionStateType; /* _state.c */

#define KIND_REQUEST 2  /* polyrpc.wire.frames.Kind */
#define KIND_RESPONSE 3
#define KIND_ERROR 4

static const PolyrpcFramesCAPI *codec; /* the frame codec's C API */
static PyObject *str_set_result, *str_done;

typedef struct {
    DecoderObject decoder;          /* the codec's part, read and written by the codec only */
    PyObject *on_frames, *on_error; /* callables, NULL until route() */
    PyObject *replies;              /* dict seq -> future, or NULL */
    PyObject *hold;                 /* a sized object: while non-empty, replies go to on_frames */
    PyObject *on_request;           /* callable for a REQUEST that arrives alone, or NULL */
    char serving_one;               /* true while on_request serves such a lone request */
} RouterObject;

static PyTypeObject RouterType;

PyDoc_STRVAR(route_doc,
             "route(on_frames, on_error, replies=None, hold=None, on_request=None)\n--\n\n"
             "Where received() and received_data() deliver: a batch's leading RESPONSE and\n"
             "ERROR frames that answer a future in ``replies`` resolve it here (while ``hold``\n"
             "is empty); a REQUEST left alone goes to on_request(frame) with serving_one set;\n"
             "other frames go to on_frames(list) in order, a ProtocolError to on_error(exc).");

static PyObject *
Router_route(RouterObject *d, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"on_frames", "on_error", "replies", "hold", "on_request", NULL};
    PyObject *on_frames, *on_error, *replies = Py_None, *hold = Py_None, *on_request = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOO:route", kwlist, &on_frames, &on_error,
                                     &replies, &hold, &on_request))
        return NULL;
    if (!PyCallable_Check(on_frames) || !PyCallable_Check(on_error) ||
        (on_request != Py_None && !PyCallable_Check(on_request))) {
        PyErr_SetString(PyExc_TypeError,
                        "route(): on_frames, on_error and on_request must be callable");
        return NULL;
    }
    if (replies != Py_None && !PyDict_CheckExact(replies)) {
        PyErr_SetString(PyExc_TypeError, "route(): replies must be a dict or None");
        return NULL;
    }
    Py_XSETREF(d->on_frames, Py_NewRef(on_frames));
    Py_XSETREF(d->on_error, Py_NewRef(on_error));
    Py_XSETREF(d->replies, replies == Py_None ? NULL : Py_NewRef(replies));
    Py_XSETREF(d->hold, hold == Py_None ? NULL : Py_NewRef(hold));
    Py_XSETREF(d->on_request, on_request == Py_None ? NULL : Py_NewRef(on_request));
    Py_RETURN_NONE;
}

/* Resolve the reply future ``frame`` answers, if routing may: 1 if done, 0 if not, -1 error. */
static int
router_resolve(RouterObject *d, PyObject *frame)
{
    FrameObject *f = (FrameObject *)frame;
    long kind = PyLong_AsLong(f->kind);
    if (kind != KIND_RESPONSE && kind != KIND_ERROR)
        return 0;
    if (d->hold != NULL) {
        Py_ssize_t held = PyObject_Size(d->hold);
        if (held != 0)
            return held < 0 ? -1 : 0;
    }
    PyObject *future = PyDict_GetItemWithError(d->replies, f->seq);
    if (future == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(future);
    int rc = PyDict_DelItem(d->replies, f->seq);
    PyObject *r = rc < 0 ? NULL : PyObject_CallMethodOneArg(future, str_set_result, frame);
    int done = 0; /* set_result failed: fine if the future was done already (cancelled),
                   * nobody waits for the reply; asked only then, so replies cost no done() */
    if (r == NULL && rc == 0) {
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyObject *was_done = PyObject_CallMethodNoArgs(future, str_done);
        done = was_done == NULL ? -1 : PyObject_IsTrue(was_done);
        Py_XDECREF(was_done);
        if (done == 0)
            PyErr_Restore(type, exc, tb);
        else {
            Py_XDECREF(type);
            Py_XDECREF(exc);
            Py_XDECREF(tb);
        }
    }
    Py_DECREF(future);
    if (r != NULL || done > 0) {
        Py_XDECREF(r);
        return 1;
    }
    return -1;
}

/* Deliver completed frames (consumed) as route() says; a NULL list means the decoder
 * failed: a ProtocolError goes to on_error, anything else propagates. */
static PyObject *
router_deliver(RouterObject *d, PyObject *frames)
{
    if (frames == NULL) {
        if (!PyErr_ExceptionMatches(*codec->protocol_error))
            return NULL;
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        PyObject *on_error = Py_NewRef(d->on_error); /* the callee may route() elsewhere */
        PyObject *r = PyObject_CallOneArg(on_error, exc);
        Py_DECREF(on_error);
        Py_XDECREF(exc);
        return r;
    }
    Py_ssize_t n = PyList_GET_SIZE(frames), i = 0;
    if (d->replies != NULL) {
        for (; i < n; i++) {
            int resolved = router_resolve(d, PyList_GET_ITEM(frames, i));
            if (resolved < 0) {
                Py_DECREF(frames);
                return NULL;
            }
            if (!resolved)
                break;
        }
    }
    if (i == n) {
        Py_DECREF(frames);
        Py_RETURN_NONE;
    }
    PyObject *last = PyList_GET_ITEM(frames, n - 1);
    if (i == n - 1 && d->on_request != NULL &&
        PyLong_AsLong(((FrameObject *)last)->kind) == KIND_REQUEST) {
        Py_INCREF(last);
        Py_DECREF(frames);
        d->serving_one = 1;
        PyObject *on_request = Py_NewRef(d->on_request); /* the callee may route() elsewhere */
        PyObject *r = PyObject_CallOneArg(on_request, last);
        Py_DECREF(on_request);
        d->serving_one = 0;
        Py_DECREF(last);
        return r == NULL ? router_deliver(d, NULL) : r;
    }
    if (i) {
        Py_SETREF(frames, PyList_GetSlice(frames, i, n));
        if (frames == NULL)
            return NULL;
    }
    PyObject *on_frames = Py_NewRef(d->on_frames); /* the callee may route() elsewhere */
    PyObject *r = PyObject_CallOneArg(on_frames, frames);
    Py_DECREF(on_frames);
    Py_DECREF(frames);
    return r;
}

static int
router_routed(RouterObject *d, const char *name)
{
    if (d->on_frames != NULL)
        return 0;
    PyErr_Format(PyExc_RuntimeError, "RoutingDecoder.%s() needs route() first", name);
    return -1;
}

PyDoc_STRVAR(received_doc,
             "received(nbytes)\n--\n\n"
             "buffer_updated() for a socket: the completed frames are delivered as route() says.");

static PyObject *
Router_received(RouterObject *d, PyObject *arg)
{
    if (router_routed(d, "received") < 0)
        return NULL;
    return router_deliver(d, codec->filled((PyObject *)d, arg, "received"));
}

PyDoc_STRVAR(received_data_doc,
             "received_data(data)\n--\n\n"
             "feed() for a stream that hands over bytes: the frames are delivered as route() says.");

static PyObject *
Router_received_data(RouterObject *d, PyObject *data)
{
    if (router_routed(d, "received_data") < 0)
        return NULL;
    return router_deliver(d, codec->feed((PyObject *)d, data));
}


static int
Router_traverse(RouterObject *d, visitproc visit, void *arg)
{
    Py_VISIT(d->on_frames);
    Py_VISIT(d->on_error);
    Py_VISIT(d->replies);
    Py_VISIT(d->hold);
    Py_VISIT(d->on_request);
    return codec->decoder_type->tp_traverse((PyObject *)d, visit, arg);
}

static int
Router_clear(RouterObject *d)
{
    Py_CLEAR(d->on_frames);
    Py_CLEAR(d->on_error);
    Py_CLEAR(d->replies);
    Py_CLEAR(d->hold);
    Py_CLEAR(d->on_request);
    return codec->decoder_type->tp_clear((PyObject *)d);
}

static void
Router_dealloc(RouterObject *d)
{
    PyObject_GC_UnTrack(d);
    Py_CLEAR(d->on_frames);
    Py_CLEAR(d->on_error);
    Py_CLEAR(d->replies);
    Py_CLEAR(d->hold);
    Py_CLEAR(d->on_request);
    codec->decoder_type->tp_dealloc((PyObject *)d); /* the codec's part, then the memory */
}

static PyMethodDef Router_methods[] = {
    {"route", (PyCFunction)(void (*)(void))Router_route, METH_VARARGS | METH_KEYWORDS, route_doc},
    {"received", (PyCFunction)Router_received, METH_O, received_doc},
    {"received_data", (PyCFunction)Router_received_data, METH_O, received_data_doc},
    {NULL},
};

static PyMemberDef Router_members[] = {
    {"serving_one", T_BOOL, offsetof(RouterObject, serving_one), 0,
     "True while route()'s on_request serves a request that arrived alone (its reply can\n"
     "go out at once: there is nothing to batch it with)."},
    {NULL},
};

static PyTypeObject RouterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polyrpc.session._routing.RoutingDecoder",
    .tp_doc = "RoutingDecoder(limits=None, *, handshake=False)\n--\n\n"
              "The frame decoder as a session's receiving end: route() says where\n"
              "received() and received_data() deliver what they decode.",
    .tp_basicsize = sizeof(RouterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)Router_dealloc,
    .tp_traverse = (traverseproc)Router_traverse,
    .tp_clear = (inquiry)Router_clear,
    .tp_methods = Router_methods,
    .tp_members = Router_members,
};

/* What the RPC layer's C code uses of this one (see _routing.h). */

static int
api_serving_one(PyObject *decoder)
{
    return Py_IS_TYPE(decoder, &RouterType) ? ((RouterObject *)decoder)->serving_one : -1;
}

static PolyrpcRoutingCAPI routing_c_api = {
    .serving_one = api_serving_one,
    .session_state_type = &SessionStateType,
};

static struct PyModuleDef routing_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "polyrpc.session._routing",
    .m_doc = "C implementation of polyrpc.session.routing's RoutingDecoder and of\n"
             "polyrpc.session.state's SessionState.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__routing(void)
{
    if (codec == NULL) { /* set last: a failed import is tried again in full */
        const PolyrpcFramesCAPI *codec_api = polyrpc_frames_import();
        if (codec_api == NULL)
            return NULL;
        str_set_result = PyUnicode_InternFromString("set_result");
        str_done = PyUnicode_InternFromString("done");
        if (!str_set_result || !str_done)
            return NULL;
        codec = codec_api;
    }
    RouterType.tp_base = codec->decoder_type;
    if (PyType_Ready(&RouterType) < 0 || PyType_Ready(&SessionStateType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&routing_moduledef);
    if (m == NULL)
        return NULL;
    PyObject *api = PyCapsule_New(&routing_c_api, POLYRPC_ROUTING_CAPSULE, NULL);
    int added = api ? PyModule_AddObjectRef(m, POLYRPC_ROUTING_CAPSULE_ATTR, api) : -1;
    Py_XDECREF(api);
    if (added < 0 || PyModule_AddObjectRef(m, "RoutingDecoder", (PyObject *)&RouterType) < 0 ||
        PyModule_AddObjectRef(m, "SessionState", (PyObject *)&SessionStateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
