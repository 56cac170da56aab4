"""A real ``polyrpc serve kcp@... --demo`` server in a subprocess, for tests that need a
separate process (crashes, kill -9, RSS measured from /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.budgets import rss

ROOT = Path(__file__).resolve().parents[1]

BARE_SERVER = """
import asyncio, sys
from polyrpc.stream.registry import registry
from polyrpc.session.runtime import run

class Sink:
    def data_received(self, data): pass
    def eof_received(self): pass
    def connection_lost(self, exc): pass

async def main():
    transport, address = registry.resolve(sys.argv[1])
    listener = await transport.listen(address, lambda stream: stream.set_receiver(Sink()))
    print("serving on", listener.url, flush=True)
    print("methods: none", flush=True)
    await asyncio.Event().wait()

run(main())
"""


class ServerProcess:
    """``polyrpc serve URL --demo`` started with ``python -m polyrpc.cli``; stderr goes to a
    file (a pipe nobody drains could block the server on its own log lines)."""

    def __init__(
        self, url: str = "kcp@127.0.0.1:0?mode=fast3", *, pure: bool = False, bare: bool = False
    ) -> None:
        env = dict(os.environ)
        env.pop("POLYRPC_PURE_PYTHON", None)
        if pure:
            env["POLYRPC_PURE_PYTHON"] = "1"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        # bare: the transport alone, a listener whose streams discard what they get
        serve = ["-m", "polyrpc.cli", "serve", url, "--demo"]
        argv = ["-c", BARE_SERVER, url] if bare else serve
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", *argv],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.url = ""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited early: {self.stderr()}")
            if line.startswith("serving on "):
                self.url = line.split()[-1]
            if line.startswith("methods:"):
                break
        self.port = int(self.url.split("?")[0].rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read()

    def rss_kib(self) -> int:
        """The server's resident set size (VmRSS from /proc), KiB."""
        return rss(self.pid) >> 10

    def kill(self) -> None:
        """SIGKILL: the process dies without a word to its peers."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        """Stop the server and release the pipes."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
