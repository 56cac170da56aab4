/* polyrpc.session._routing.SessionState: the C base type of a session that owns the state
 * the RPC layer's call server reads and writes on every reply (polyrpc/session/_state.h),
 * so that C code reads declared struct fields rather than looking attributes up by name.
 * Reference: PySessionState (polyrpc/session/state.py), the same six names as __slots__.
 * Compiled into polyrpc.session._routing, which readies and exports the type.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

#include "_state.h"

static PyMemberDef SessionState_members[] = {
    {"byte_stream", T_OBJECT_EX, offsetof(SessionStateObject, byte_stream), 0,
     "The Stream the session runs over."},
    {"bytes_out", T_OBJECT_EX, offsetof(SessionStateObject, bytes_out), 0,
     "Bytes written to the stream so far."},
    {"_gone", T_OBJECT_EX, offsetof(SessionStateObject, gone), 0,
     "True once the connection is lost."},
    {"_send_check", T_OBJECT_EX, offsetof(SessionStateObject, send_check), 0,
     "Payloads up to this size fit the peer's limit."},
    {"_in_receive", T_OBJECT_EX, offsetof(SessionStateObject, in_receive), 0,
     "True while received frames are handled."},
    {"_flush_handle", T_OBJECT_EX, offsetof(SessionStateObject, flush_handle), 0,
     "The scheduled flush, or None."},
    {NULL},
};

static int
SessionState_traverse(SessionStateObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->byte_stream);
    Py_VISIT(self->bytes_out);
    Py_VISIT(self->gone);
    Py_VISIT(self->send_check);
    Py_VISIT(self->in_receive);
    Py_VISIT(self->flush_handle);
    return 0;
}

static int
SessionState_clear(SessionStateObject *self)
{
    Py_CLEAR(self->byte_stream);
    Py_CLEAR(self->bytes_out);
    Py_CLEAR(self->gone);
    Py_CLEAR(self->send_check);
    Py_CLEAR(self->in_receive);
    Py_CLEAR(self->flush_handle);
    return 0;
}

static void
SessionState_dealloc(SessionStateObject *self)
{
    PyObject_GC_UnTrack(self);
    SessionState_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* readied and exported by _routing.c's module init */
PyTypeObject SessionStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polyrpc.session._routing.SessionState",
    .tp_doc = "SessionState()\n--\n\n"
              "A session's base: owns byte_stream, bytes_out, _gone, _send_check, _in_receive\n"
              "and _flush_handle as declared C fields, which the C call server reads directly.",
    .tp_basicsize = sizeof(SessionStateObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)SessionState_dealloc,
    .tp_traverse = (traverseproc)SessionState_traverse,
    .tp_clear = (inquiry)SessionState_clear,
    .tp_members = SessionState_members,
};
