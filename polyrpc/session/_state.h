/* polyrpc/session/_state.h: the session state the RPC layer's call server reads and writes
 * on every reply, owned by the session layer's C base type SessionState (_state.c, built
 * into polyrpc.session._routing; the call server gets the type through the capsule in
 * _routing.h and checks a connection against it once). Each field is the Python attribute
 * of the same name on a session (polyrpc/session/state.py, Session); NULL while unset.
 */
#ifndef POLYRPC_SESSION_STATE_H
#define POLYRPC_SESSION_STATE_H

#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *byte_stream;  /* byte_stream: the session's Stream */
    PyObject *bytes_out;    /* bytes_out: int, the bytes written so far */
    PyObject *gone;         /* _gone: bool, True once the connection is lost */
    PyObject *send_check;   /* _send_check: int, payloads up to it fit the peer's limit */
    PyObject *in_receive;   /* _in_receive: bool, True while received frames are handled */
    PyObject *flush_handle; /* _flush_handle: the asyncio.Handle of a scheduled flush, or None */
} SessionStateObject;

#endif
