"""Import direction between the layer folders of polyrpc/ (the map atop docs/architecture.md).

Every module is parsed with ``ast``, never imported, so a wrong import is reported even where
importing it would fail or cycle. Imports under ``if TYPE_CHECKING:`` obey the same table,
the no-asyncio rule included.

The C files (extensions and their headers) are held to the same table: every module they
import (``PyImport_ImportModule``, ``PyCapsule_Import``) and every polyrpc header they
include, and wire's C code imports no asyncio either.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "polyrpc"

LAYER_OF_PREFIX = {
    "polyrpc.errors": "errors",
    "polyrpc.wire": "wire",
    "polyrpc.stream": "stream",
    "polyrpc.session": "session",
    "polyrpc.messages": "messages",
    "polyrpc.rpc": "rpc",
    "polyrpc.cluster": "cluster",
    "polyrpc.transports._shared": "transports._shared",
    "polyrpc.transports.tcp": "transports.tcp",
    "polyrpc.transports.mem": "transports.mem",
    "polyrpc.transports.quic": "transports.quic",
    "polyrpc.transports.kcp": "transports.kcp",
    "polyrpc.transports.rdma": "transports.rdma",
    "polyrpc.transports": "transports",
    "polyrpc.cli": "top",
    "polyrpc.demo": "top",
    "polyrpc.workers": "top",
    "polyrpc.bench": "top",
    "polyrpc.testing": "top",
}
"""The layer a module belongs to: the longest prefix of its dotted name that is listed."""

TRANSPORT_MAY_IMPORT = frozenset({"errors", "stream", "transports._shared"})

MAY_IMPORT: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "wire": frozenset({"errors"}),
    "stream": frozenset({"errors"}),
    "session": frozenset({"errors", "wire", "stream"}),
    "messages": frozenset({"errors", "wire", "stream", "session"}),
    "rpc": frozenset({"errors", "wire", "stream", "session", "messages"}),
    "cluster": frozenset({"errors", "wire", "stream", "session", "messages", "rpc"}),
    "transports._shared": frozenset({"errors", "stream"}),
    "transports.tcp": TRANSPORT_MAY_IMPORT,
    "transports.mem": TRANSPORT_MAY_IMPORT,
    "transports.quic": TRANSPORT_MAY_IMPORT,
    "transports.kcp": TRANSPORT_MAY_IMPORT,
    "transports.rdma": TRANSPORT_MAY_IMPORT,
    "transports": frozenset(),
    "top": frozenset(LAYER_OF_PREFIX.values()),
}
"""Layer -> the other layers its modules may import (a layer may always import itself)."""

NO_ASYNCIO = frozenset({"wire"})
"""Layers that must stay sans-IO: no asyncio import at all."""

SANS_IO_MODULES = frozenset({"polyrpc.session.core", "polyrpc.session.timeouts"})
"""Modules of other layers that must stay sans-IO too: the session's state machine (its
asyncio adapter is polyrpc.session.session)."""


def layer_of(module: str) -> str | None:
    """The layer of a dotted polyrpc module name (the package itself is the top layer); None
    for a module outside polyrpc or in no listed folder."""
    if module == "polyrpc":
        return "top"
    parts = module.split(".")
    for length in range(len(parts), 1, -1):
        layer = LAYER_OF_PREFIX.get(".".join(parts[:length]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    """polyrpc/wire/frames.py -> polyrpc.wire.frames; a package's __init__.py names the package."""
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for every import anywhere in the module (``if TYPE_CHECKING:``
    blocks included).

    ``from package import name`` yields ``package.name`` when the package is a folder, since
    the name is then usually a submodule and its layer is the one that matters (a name that
    is an attribute of ``polyrpc/__init__.py`` lands in the top layer all the same)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            target_folder = PACKAGE_ROOT.parent.joinpath(*target.split("."))
            if target.startswith("polyrpc") and target_folder.is_dir():
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def all_modules() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


def violations(path: Path, source: str) -> list[str]:
    """Every import in ``source`` (the text of ``path``) that its layer may not make."""
    own_layer = layer_of(module_name(path))
    assert own_layer is not None
    sans_io = own_layer in NO_ASYNCIO or module_name(path) in SANS_IO_MODULES
    allowed = MAY_IMPORT[own_layer] | {own_layer}
    found = []
    tree = ast.parse(source, filename=str(path))
    for line, target in imported_modules(path, tree):
        where = f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}"
        if sans_io and target.split(".")[0] == "asyncio":
            found.append(f"{where}: the {own_layer} layer imports asyncio")
        target_layer = layer_of(target)
        if target_layer is None and target.split(".")[0] == "polyrpc":
            target_layer = "top"  # a name of polyrpc/__init__.py, e.g. `from polyrpc import Client`
        if target_layer is not None and target_layer not in allowed:
            found.append(f"{where}: {own_layer} imports {target} ({target_layer})")
    return found


C_IMPORT = re.compile(r'\b(PyImport_ImportModule|PyCapsule_Import)\(\s*"([^"]+)"')
C_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def all_c_files() -> list[Path]:
    return sorted([*PACKAGE_ROOT.rglob("*.c"), *PACKAGE_ROOT.rglob("*.h")])


def c_imported_modules(path: Path, source: str) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every module a C file imports by name and every polyrpc
    header it includes (as the module named by the header's path). A capsule's name is
    ``module.attribute``: the module is what it imports."""
    for found in C_IMPORT.finditer(source):
        line = source.count("\n", 0, found.start()) + 1
        function, name = found.groups()
        yield line, name.rsplit(".", 1)[0] if function == "PyCapsule_Import" else name
    for found in C_INCLUDE.finditer(source):
        header = (path.parent / found.group(1)).resolve()
        if header.is_relative_to(PACKAGE_ROOT):
            yield source.count("\n", 0, found.start()) + 1, module_name(header)


def c_violations(path: Path, source: str) -> list[str]:
    """Every import or include in the C ``source`` (the text of ``path``) its layer may not make."""
    own_layer = layer_of(module_name(path))
    assert own_layer is not None
    allowed = MAY_IMPORT[own_layer] | {own_layer}
    found = []
    for line, target in c_imported_modules(path, source):
        where = f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}"
        if own_layer in NO_ASYNCIO and target.split(".")[0] == "asyncio":
            found.append(f"{where}: the {own_layer} layer's C code imports asyncio")
        target_layer = layer_of(target)
        if target_layer is not None and target_layer not in allowed:
            found.append(f"{where}: {own_layer} imports {target} ({target_layer})")
    return found


def test_every_module_belongs_to_a_layer():
    paths = [*all_modules(), *all_c_files()]
    unplaced = [str(path) for path in paths if layer_of(module_name(path)) is None]
    assert not unplaced, f"add their folders to LAYER_OF_PREFIX and MAY_IMPORT: {unplaced}"
    assert layer_of("polyrpc.core.session") is None  # what a module in a new folder would get


def test_layers_import_only_the_layers_below():
    found = [v for path in all_modules() for v in violations(path, path.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        ("session/session.py", "from ..rpc.connection import RpcConnection", "session imports"),
        ("session/session.py", "from polyrpc.rpc import connection", "session imports"),
        ("wire/frames.py", "import asyncio", "the wire layer imports asyncio"),
        ("wire/codecs.py", "from asyncio import Future", "the wire layer imports asyncio"),
        ("session/core.py", "import asyncio", "the session layer imports asyncio"),
        ("stream/registry.py", "from polyrpc.transports.tcp import TcpTransport", "stream imports"),
        ("transports/quic/udp.py", "from ..kcp import engine", "transports.quic imports"),
        (
            "transports/mem/__init__.py",
            "from ...wire.frames import Limits",
            "transports.mem imports",
        ),
        ("messages.py", "from polyrpc import Client", "messages imports"),
        ("rpc/endpoints.py", "from ..transports._shared import certs", "rpc imports"),
        ("rpc/endpoints.py", "from ..cluster import ClusterClient", "rpc imports"),
        ("cluster/client.py", "from ..transports.tcp import TcpTransport", "cluster imports"),
    ],
)
def test_a_wrong_import_is_reported(module, added, expected):
    """The check catches what it is for: an import the table forbids, added to a real module
    (inside a function too, where imports are easy to miss)."""
    path = PACKAGE_ROOT / module
    source = path.read_text() + f"\n\ndef late():\n    {added}\n"
    found = violations(path, source)
    assert len(found) == 1 and expected in found[0], found


def test_type_checking_imports_obey_the_layers_too():
    path = PACKAGE_ROOT / "session" / "session.py"
    added = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..rpc import endpoints\n"
    found = violations(path, path.read_text() + "\n" + added)
    assert len(found) == 1 and "session imports polyrpc.rpc.endpoints" in found[0], found


def test_c_code_imports_only_the_layers_below():
    assert any(path.name == "_frames.c" for path in all_c_files())  # the check sees the C code
    found = [v for path in all_c_files() for v in c_violations(path, path.read_text())]
    assert not found, "\n".join(found)


def test_c_code_sees_what_it_imports():
    """The call server reaches the codec through its header and capsule: both are seen."""
    path = PACKAGE_ROOT / "rpc" / "_callserver.c"
    imported = {target for _, target in c_imported_modules(path, path.read_text())}
    assert {"polyrpc.wire._frames", "time"} <= imported, imported


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        (
            "wire/_frames.c",
            'PyImport_ImportModule("asyncio");',
            "wire layer's C code imports asyncio",
        ),
        ("wire/_frames.c", 'PyImport_ImportModule("polyrpc.session.session");', "wire imports"),
        ("wire/_frames.h", '#include "../rpc/other.h"', "wire imports polyrpc.rpc.other (rpc)"),
        (
            "wire/_frames.c",
            'PyCapsule_Import("polyrpc.rpc._callserver._C_API", 0);',
            "wire imports",
        ),
    ],
)
def test_a_wrong_c_import_is_reported(module, added, expected):
    """The C check catches a forbidden import added to a real C file."""
    path = PACKAGE_ROOT / module
    found = c_violations(path, path.read_text() + "\n" + added + "\n")
    assert len(found) == 1 and expected in found[0], found
