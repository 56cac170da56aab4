/* polyrpc/session/_routing.h: what the session layer's C code (polyrpc.session._routing)
 * offers the RPC layer's, through a capsule (see polyrpc/wire/_frames.h for the pattern).
 */
#ifndef POLYRPC_SESSION_ROUTING_H
#define POLYRPC_SESSION_ROUTING_H

#include <Python.h>

#define POLYRPC_ROUTING_CAPSULE_ATTR "_C_API"
#define POLYRPC_ROUTING_CAPSULE "polyrpc.session._routing._C_API"

typedef struct {
    /* whether a C RoutingDecoder is serving a request that arrived alone (1 or 0); -1,
     * without an exception, for any other object */
    int (*serving_one)(PyObject *decoder);
    /* SessionState (_state.h): a session that is an instance of it has its fields */
    PyTypeObject *session_state_type;
} PolyrpcRoutingCAPI;

/* The routing C API (borrowed, lives as long as the process), or NULL with an exception
 * (ImportError when the session's extension is missing). */
static inline const PolyrpcRoutingCAPI *
polyrpc_routing_import(void)
{
    /* PyCapsule_Import imports only "polyrpc" and looks the rest up as attributes */
    PyObject *module = PyImport_ImportModule("polyrpc.session._routing");
    if (module == NULL)
        return NULL;
    Py_DECREF(module);
    const PolyrpcRoutingCAPI *api = PyCapsule_Import(POLYRPC_ROUTING_CAPSULE, 0);
    if (api == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) { /* an older build */
        PyErr_Clear();
        PyErr_SetString(PyExc_ImportError, "polyrpc.session._routing exports no C API");
    }
    return api;
}

#endif
