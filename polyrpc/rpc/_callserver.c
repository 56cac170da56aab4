/* polyrpc.rpc._callserver: the RPC layer's C accelerator, a stand-in for two Python paths.
 *
 * coroutine_step (reference: polyrpc/rpc/eager.py) runs a handler's first step without a
 * task; EagerServer (reference: RpcConnection.on_request in polyrpc/rpc/connection.py)
 * serves a connection's usual calls and hands every other frame to that reference.
 * It reads frames and encodes replies through the frame codec's C API (polyrpc/wire/
 * _frames.h), asks the session's routing decoder whether it serves a lone request
 * (polyrpc/session/_routing.h) and reads and writes the session's state as the fields of
 * its C base type SessionState (polyrpc/session/_state.h), checked once per connection.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "../session/_routing.h"
#include "../session/_state.h"
#include "../wire/_frames.h"

#define KIND_RESPONSE 3 /* polyrpc.wire.frames.Kind.RESPONSE */

static const PolyrpcFramesCAPI *frames;   /* the codec's C API */
static const PolyrpcRoutingCAPI *routing; /* the session's routing decoder's C API */

/* ============================================================ coroutine_step */

PyDoc_STRVAR(coroutine_step_doc,
             "coroutine_step(coro)\n--\n\n"
             "Send None into ``coro``: (True, its result) if it finished, (False, what it\n"
             "yielded) if it suspended; its exceptions propagate. coro.send(None) without\n"
             "the cost of a StopIteration per finished call.");

static PyObject *
coroutine_step(PyObject *module, PyObject *coro)
{
    PyObject *value;
    PySendResult status = PyIter_Send(coro, Py_None, &value);
    if (status == PYGEN_ERROR)
        return NULL;
    PyObject *pair = PyTuple_Pack(2, status == PYGEN_RETURN ? Py_True : Py_False, value);
    Py_DECREF(value);
    return pair;
}

/* ============================================================== EagerServer */

/* The usual RPC call served without Python code of polyrpc's own: an async handler whose
 * first step finishes, called with plain arguments. Reference: RpcConnection.on_request
 * (polyrpc/rpc/connection.py), which every other call is handed to, unchanged. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *connection;        /* the RpcConnection: the call context's first item */
    SessionStateObject *session; /* the connection as a SessionState (same reference), or
                                  * NULL for any other object: then every frame goes to
                                  * ``reference`` */
    PyObject *reference;         /* the Python on_request: serves what this does not */
    PyObject *methods;           /* dict: name -> Method */
    PyObject *known;             /* dict: name -> (Method, func, stats, stats.durations.append)
                                  * for async methods, checked against ``methods`` */
    PyObject *incoming;          /* dict: calls still running; its size is checked */
    Py_ssize_t max_calls;
    long codec_id;
    PyObject *decode;            /* the session codec's unchecked decode */
    PyObject *context;           /* the ContextVar holding (connection, frame, started) */
    PyObject *perf_counter;      /* time.perf_counter */
    PyObject *write;             /* connection._write */
    PyObject *respond;           /* connection.respond: results that are not bytes */
    PyObject *report_failure;    /* connection._report_failure */
    PyObject *continue_call;     /* connection._continue_eagerly: a handler that suspended */
    PyObject *pending;           /* connection._pending */
    PyObject *decoder;           /* connection._decoder, when it is this module's */
} EagerServerObject;

static PyObject *long_one;   /* 1 */
static PyObject *kind_response; /* Kind.RESPONSE */
static PyObject *small_zero; /* 0: the decoder's frames share CPython's small int */
static PyObject *str_kind, *str_async, *str_func, *str_stats, *str_calls, *str_durations,
    *str_append, *str_write_now;

static PyObject *
eager_fallback(EagerServerObject *self, PyObject *frame)
{
    return PyObject_CallOneArg(self->reference, frame);
}

/* (args tuple, kwargs dict or NULL) of a call frame; 0 to fall back (no exception), -1 error. */
static int
eager_arguments(EagerServerObject *self, FrameObject *f, PyObject **args, PyObject **kwargs)
{
    long codec = PyLong_AsLong(f->codec);
    *kwargs = NULL;
    if (codec == -1 && PyErr_Occurred())
        return -1;
    if (codec == 0) { /* a lone bytes argument, sent raw */
        PyObject *payload = PyBytes_CheckExact(f->payload) ? Py_NewRef(f->payload)
                                                           : PyBytes_FromObject(f->payload);
        if (payload == NULL)
            return -1;
        *args = PyTuple_Pack(1, payload);
        Py_DECREF(payload);
        return *args == NULL ? -1 : 1;
    }
    if (codec != self->codec_id)
        return 0;
    PyObject *body = PyObject_CallOneArg(self->decode, f->payload);
    if (body == NULL) {
        PyErr_Clear(); /* the reference decodes again and reports the error */
        return 0;
    }
    int shaped = PyList_CheckExact(body) && PyList_GET_SIZE(body) == 2 &&
                 PyList_CheckExact(PyList_GET_ITEM(body, 0)) &&
                 PyDict_CheckExact(PyList_GET_ITEM(body, 1));
    if (!shaped) {
        Py_DECREF(body);
        return 0;
    }
    *args = PyList_AsTuple(PyList_GET_ITEM(body, 0));
    if (*args != NULL && PyDict_GET_SIZE(PyList_GET_ITEM(body, 1)))
        *kwargs = Py_NewRef(PyList_GET_ITEM(body, 1));
    Py_DECREF(body);
    return *args == NULL ? -1 : 1;
}

/* The known-method entry for an async method (new reference); NULL without an exception
 * for any other kind (those calls go to the reference). */
static PyObject *
eager_learn(EagerServerObject *self, PyObject *name, PyObject *method)
{
    PyObject *kind = PyObject_GetAttr(method, str_kind);
    if (kind == NULL)
        return NULL;
    int is_async = PyUnicode_Check(kind) && PyUnicode_Compare(kind, str_async) == 0;
    Py_DECREF(kind);
    if (!is_async)
        return NULL;
    PyObject *func = PyObject_GetAttr(method, str_func);
    PyObject *stats = func ? PyObject_GetAttr(method, str_stats) : NULL;
    PyObject *durations = stats ? PyObject_GetAttr(stats, str_durations) : NULL;
    PyObject *append = durations ? PyObject_GetAttr(durations, str_append) : NULL;
    PyObject *entry = append ? PyTuple_Pack(4, method, func, stats, append) : NULL;
    Py_XDECREF(func);
    Py_XDECREF(stats);
    Py_XDECREF(durations);
    Py_XDECREF(append);
    if (entry != NULL && PyDict_SetItem(self->known, name, entry) < 0)
        Py_CLEAR(entry);
    return entry;
}

/* Count the call in the method's stats: calls += 1, durations.append(elapsed). */
static int
eager_record(EagerServerObject *self, PyObject *entry, PyObject *started)
{
    PyObject *stats = PyTuple_GET_ITEM(entry, 2);
    PyObject *calls = PyObject_GetAttr(stats, str_calls);
    PyObject *more = calls ? PyNumber_Add(calls, long_one) : NULL;
    Py_XDECREF(calls);
    int rc = more == NULL ? -1 : PyObject_SetAttr(stats, str_calls, more);
    Py_XDECREF(more);
    if (rc < 0)
        return -1;
    PyObject *now = PyObject_CallNoArgs(self->perf_counter);
    PyObject *elapsed = now ? PyNumber_Subtract(now, started) : NULL;
    PyObject *r = elapsed ? PyObject_CallOneArg(PyTuple_GET_ITEM(entry, 3), elapsed) : NULL;
    Py_XDECREF(now);
    Py_XDECREF(elapsed);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Session._write's direct path for the reply to a request that arrived alone: written at
 * once through the stream's write_now. 1 if sent, 0 if _write must decide, -1 on error. */
static int
eager_send_now(EagerServerObject *self, PyObject *buffers)
{
    SessionStateObject *session = self->session;
    if (self->decoder == NULL || routing->serving_one(self->decoder) != 1 ||
        PyDict_GET_SIZE(self->pending) > 1 || PyList_GET_SIZE(buffers) != 1 ||
        session->in_receive != Py_False || session->flush_handle != Py_None ||
        session->byte_stream == NULL)
        return 0;
    PyObject *stream = Py_NewRef(session->byte_stream); /* the lookup may run Python code */
    PyObject *write_now = PyObject_GetAttr(stream, str_write_now);
    Py_DECREF(stream);
    if (write_now == NULL)
        return -1;
    if (write_now == Py_None || session->bytes_out == NULL ||
        !PyLong_CheckExact(session->bytes_out)) {
        Py_DECREF(write_now);
        return 0;
    }
    PyObject *frame = PyList_GET_ITEM(buffers, 0);
    Py_ssize_t length = PyObject_Length(frame);
    PyObject *size = length < 0 ? NULL : PyLong_FromSsize_t(length);
    PyObject *total = size ? PyNumber_Add(session->bytes_out, size) : NULL;
    Py_XDECREF(size);
    if (total != NULL)
        Py_SETREF(session->bytes_out, total);
    PyObject *r = total != NULL ? PyObject_CallOneArg(write_now, frame) : NULL;
    Py_DECREF(write_now);
    Py_XDECREF(r);
    return r == NULL ? -1 : 1;
}

/* Whether a raw payload of ``size`` bytes surely fits the peer's max_frame: the session's
 * _send_check bound (Session.respond checks bigger ones exactly). -1 on error. */
static int
eager_fits(EagerServerObject *self, Py_ssize_t size)
{
    PyObject *bound = self->session->send_check;
    if (bound == NULL || !PyLong_CheckExact(bound))
        return 0;
    Py_ssize_t limit = PyLong_AsSsize_t(bound);
    if (limit == -1 && PyErr_Occurred())
        return -1;
    return size <= limit;
}

/* Send the result: bytes as a raw RESPONSE (as Session._write would), the rest by respond(),
 * which also answers a result over the peer's limit with a small ERROR (result_too_large). */
static PyObject *
eager_reply(EagerServerObject *self, PyObject *seq, PyObject *result)
{
    int fits = PyBytes_CheckExact(result) ? eager_fits(self, PyBytes_GET_SIZE(result)) : 0;
    if (fits > 0 && self->session->gone != Py_False)
        fits = 0; /* a session that is gone answers through respond() */
    if (fits < 0)
        return NULL;
    if (fits) {
        int ok;
        PyObject *buffers = frames->encode_plain(kind_response, seq, result, &ok);
        if (buffers != NULL) {
            int sent = eager_send_now(self, buffers);
            PyObject *r = NULL;
            if (sent == 0) {
                PyObject *args[2] = {buffers, Py_False};
                r = PyObject_Vectorcall(self->write, args, 2, NULL);
            }
            else if (sent == 1)
                r = Py_NewRef(Py_None);
            Py_DECREF(buffers);
            return r;
        }
        if (ok)
            return NULL;
    }
    PyObject *args[2] = {seq, result};
    return PyObject_Vectorcall(self->respond, args, 2, NULL);
}

/* Call the handler and take its first step, with the call context set. */
static PyObject *
eager_run(EagerServerObject *self, PyObject *frame, PyObject *entry, PyObject *args,
          PyObject *kwargs)
{
    PyObject *method = PyTuple_GET_ITEM(entry, 0);
    PyObject *seq = ((FrameObject *)frame)->seq;
    PyObject *started = PyObject_CallNoArgs(self->perf_counter);
    if (started == NULL)
        return NULL;
    PyObject *value = PyTuple_Pack(3, self->connection, frame, started);
    PyObject *token = value ? PyContextVar_Set(self->context, value) : NULL;
    Py_XDECREF(value);
    if (token == NULL) {
        Py_DECREF(started);
        return NULL;
    }
    PyObject *outcome = NULL, *yielded = NULL;
    int finished = 0;
    PyObject *coro = PyObject_Call(PyTuple_GET_ITEM(entry, 1), args, kwargs);
    if (coro != NULL) {
        PySendResult status = PyIter_Send(coro, Py_None, &yielded);
        if (status != PYGEN_ERROR)
            finished = status == PYGEN_RETURN;
        else
            yielded = NULL;
    }
    if (yielded == NULL) { /* the handler raised, whatever it raised: answer it (codes and
                            * logging as in _report_failure), the server goes on */
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        if (tb != NULL && exc != NULL)
            PyException_SetTraceback(exc, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        PyObject *arg_list = exc ? PySequence_List(args) : NULL;
        PyObject *kw = arg_list == NULL ? NULL : kwargs ? Py_NewRef(kwargs) : PyDict_New();
        if (arg_list != NULL && kw != NULL) {
            PyObject *call[6] = {seq, method, exc, started, arg_list, kw};
            outcome = PyObject_Vectorcall(self->report_failure, call, 6, NULL);
        }
        Py_XDECREF(arg_list);
        Py_XDECREF(kw);
        Py_XDECREF(exc);
    }
    else if (!finished) { /* it waits on something: the rest runs in a task */
        PyObject *call[5] = {seq, method, coro, yielded, started};
        outcome = PyObject_Vectorcall(self->continue_call, call, 5, NULL);
    }
    PyObject *error_type, *error, *error_tb; /* keep an error across the cleanup */
    PyErr_Fetch(&error_type, &error, &error_tb);
    int reset = PyContextVar_Reset(self->context, token);
    Py_DECREF(token);
    Py_XDECREF(coro);
    if (error_type != NULL)
        PyErr_Restore(error_type, error, error_tb);
    else if (reset < 0)
        Py_CLEAR(outcome);
    if (finished) { /* the usual case: count it, then answer */
        if (eager_record(self, entry, started) == 0)
            outcome = eager_reply(self, seq, yielded);
    }
    Py_XDECREF(yielded);
    Py_DECREF(started);
    return outcome;
}

static PyObject *
EagerServer_vectorcall(EagerServerObject *self, PyObject *const *argv, size_t nargsf,
                       PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "EagerServer takes one frame");
        return NULL;
    }
    PyObject *frame = argv[0];
    if (self->session == NULL || Py_TYPE(frame) != frames->frame_type)
        return eager_fallback(self, frame);
    FrameObject *f = (FrameObject *)frame;
    /* only what the decoder builds takes the fast path (frames' fields are writable) */
    if (PyDict_GET_SIZE(self->incoming) >= self->max_calls || f->flags != small_zero ||
        !PyLong_CheckExact(f->codec) || !PyDict_CheckExact(f->metadata) ||
        !PyUnicode_CheckExact(f->method))
        return eager_fallback(self, frame);
    /* metadata (a deadline, trace context, a key added later) is the Python path's to read */
    if (PyDict_GET_SIZE(f->metadata))
        return eager_fallback(self, frame);
    PyObject *method = PyDict_GetItemWithError(self->methods, f->method);
    if (method == NULL)
        return PyErr_Occurred() ? NULL : eager_fallback(self, frame);
    PyObject *entry = PyDict_GetItemWithError(self->known, f->method);
    if (entry != NULL && PyTuple_GET_ITEM(entry, 0) == method) {
        Py_INCREF(entry);
    }
    else {
        if (PyErr_Occurred())
            return NULL;
        Py_INCREF(method); /* learning runs Python code that may drop it from ``methods`` */
        entry = eager_learn(self, f->method, method);
        Py_DECREF(method);
        if (entry == NULL)
            return PyErr_Occurred() ? NULL : eager_fallback(self, frame);
    }
    PyObject *args = NULL, *kwargs = NULL, *outcome;
    int usable = eager_arguments(self, f, &args, &kwargs);
    if (usable > 0)
        outcome = eager_run(self, frame, entry, args, kwargs);
    else
        outcome = usable < 0 ? NULL : eager_fallback(self, frame);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_DECREF(entry);
    return outcome;
}

static PyObject *
EagerServer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"connection", "reference", "context", NULL};
    PyObject *connection, *reference, *context;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:EagerServer", kwlist, &connection,
                                     &reference, &context))
        return NULL;
    if (!PyContextVar_CheckExact(context)) {
        PyErr_SetString(PyExc_TypeError, "EagerServer: context must be a ContextVar");
        return NULL;
    }
    EagerServerObject *self = (EagerServerObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)EagerServer_vectorcall;
    self->connection = Py_NewRef(connection);
    if (PyObject_TypeCheck(connection, routing->session_state_type))
        self->session = (SessionStateObject *)connection;
    self->reference = Py_NewRef(reference);
    self->context = Py_NewRef(context);
    PyObject *max_calls = PyObject_GetAttrString(connection, "_max_calls");
    PyObject *codec_id = PyObject_GetAttrString(connection, "_codec_id");
    PyObject *time_module = PyImport_ImportModule("time");
    self->methods = PyObject_GetAttrString(connection, "_methods");
    self->known = PyDict_New();
    self->incoming = PyObject_GetAttrString(connection, "_incoming");
    self->decode = PyObject_GetAttrString(connection, "_decode_unchecked");
    self->write = PyObject_GetAttrString(connection, "_write");
    self->respond = PyObject_GetAttrString(connection, "respond");
    self->report_failure = PyObject_GetAttrString(connection, "_report_failure");
    self->continue_call = PyObject_GetAttrString(connection, "_continue_eagerly");
    self->pending = PyObject_GetAttrString(connection, "_pending");
    PyObject *decoder = PyObject_GetAttrString(connection, "_decoder");
    if (decoder != NULL && routing->serving_one(decoder) >= 0)
        self->decoder = decoder;
    else
        Py_XDECREF(decoder); /* a pure-Python decoder: replies always go through _write */
    self->perf_counter = time_module ? PyObject_GetAttrString(time_module, "perf_counter") : NULL;
    Py_XDECREF(time_module);
    if (max_calls != NULL)
        self->max_calls = PyNumber_AsSsize_t(max_calls, PyExc_OverflowError);
    if (codec_id != NULL)
        self->codec_id = PyLong_AsLong(codec_id);
    Py_XDECREF(max_calls);
    Py_XDECREF(codec_id);
    if (PyErr_Occurred()) {
        Py_DECREF(self);
        return NULL;
    }
    if (!PyDict_CheckExact(self->methods) || !PyDict_CheckExact(self->incoming) ||
        !PyDict_CheckExact(self->pending)) {
        PyErr_SetString(PyExc_TypeError,
                        "EagerServer: _methods, _incoming and _pending must be dicts");
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
EagerServer_traverse(EagerServerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->connection);
    Py_VISIT(self->reference);
    Py_VISIT(self->methods);
    Py_VISIT(self->known);
    Py_VISIT(self->incoming);
    Py_VISIT(self->decode);
    Py_VISIT(self->context);
    Py_VISIT(self->perf_counter);
    Py_VISIT(self->write);
    Py_VISIT(self->respond);
    Py_VISIT(self->report_failure);
    Py_VISIT(self->continue_call);
    Py_VISIT(self->pending);
    Py_VISIT(self->decoder);
    return 0;
}

static int
EagerServer_clear(EagerServerObject *self)
{
    self->session = NULL;
    Py_CLEAR(self->connection);
    Py_CLEAR(self->reference);
    Py_CLEAR(self->methods);
    Py_CLEAR(self->known);
    Py_CLEAR(self->incoming);
    Py_CLEAR(self->decode);
    Py_CLEAR(self->context);
    Py_CLEAR(self->perf_counter);
    Py_CLEAR(self->write);
    Py_CLEAR(self->respond);
    Py_CLEAR(self->report_failure);
    Py_CLEAR(self->continue_call);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->decoder);
    return 0;
}

static void
EagerServer_dealloc(EagerServerObject *self)
{
    PyObject_GC_UnTrack(self);
    EagerServer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject EagerServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polyrpc.rpc._callserver.EagerServer",
    .tp_doc = "EagerServer(connection, reference, context)\n--\n\n"
              "Serves a connection's usual calls (no flags, no metadata, an async handler that\n"
              "finishes in its first step) in C; hands every other frame to ``reference``\n"
              "(RpcConnection.on_request), so what it does not understand stays Python's.",
    .tp_basicsize = sizeof(EagerServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = EagerServer_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(EagerServerObject, vectorcall),
    .tp_dealloc = (destructor)EagerServer_dealloc,
    .tp_traverse = (traverseproc)EagerServer_traverse,
    .tp_clear = (inquiry)EagerServer_clear,
};

static PyMethodDef module_methods[] = {
    {"coroutine_step", (PyCFunction)coroutine_step, METH_O, coroutine_step_doc},
    {NULL},
};

static struct PyModuleDef callserver_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "polyrpc.rpc._callserver",
    .m_doc = "C implementation of polyrpc.rpc's call serving (coroutine_step, EagerServer).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__callserver(void)
{
    if (PyType_Ready(&EagerServerType) < 0)
        return NULL;
    if (routing == NULL) { /* set last: a failed import is tried again in full */
        frames = polyrpc_frames_import();
        const PolyrpcRoutingCAPI *routing_api = frames ? polyrpc_routing_import() : NULL;
        if (routing_api == NULL)
            return NULL;
        long_one = PyLong_FromLong(1);
        small_zero = PyLong_FromLong(0);
        kind_response = PyLong_FromLong(KIND_RESPONSE);
        str_kind = PyUnicode_InternFromString("kind");
        str_async = PyUnicode_InternFromString("async");
        str_func = PyUnicode_InternFromString("func");
        str_stats = PyUnicode_InternFromString("stats");
        str_calls = PyUnicode_InternFromString("calls");
        str_durations = PyUnicode_InternFromString("durations");
        str_append = PyUnicode_InternFromString("append");
        str_write_now = PyUnicode_InternFromString("write_now");
        if (!long_one || !small_zero || !kind_response || !str_kind || !str_async ||
            !str_func || !str_stats || !str_calls || !str_durations || !str_append ||
            !str_write_now)
            return NULL;
        routing = routing_api;
    }
    PyObject *m = PyModule_Create(&callserver_moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "EagerServer", (PyObject *)&EagerServerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
