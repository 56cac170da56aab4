"""cffi (API mode) build of the KCP core; run by setup.py's ``cffi_modules`` on pip install."""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
HEADER = HERE / "kcpcore.h"
SOURCES = ["kcp_engine.c", "kcp_mux.c"]


def _cdef_text() -> str:
    """The header without preprocessor lines, plus the #define constants as cffi integers."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        define = re.match(r"#define\s+(KCP_\w+)\s+\S+", line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not line.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "polyrpc.transports.kcp._kcp",
    '#include "kcpcore.h"',
    sources=[str((HERE / name).relative_to(ROOT)) for name in SOURCES],
    include_dirs=[str(HERE.relative_to(ROOT))],
    extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
