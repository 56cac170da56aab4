"""``polyrpc serve --workers N``: a supervisor process and N worker processes serving the
same URLs.

Each worker is a plain ``polyrpc serve`` process. Over tcp, tls, quic and kcp every worker
opens its own listener on the same port with SO_REUSEPORT (the kernel spreads connections,
or for UDP the peers' address pairs, across them); over unix the supervisor binds the socket
once and every worker accepts on an inherited copy. Worker 0 starts first and binds a port 0
URL, whose bound port the others then share. The supervisor restarts a worker that dies (with
a growing delay while they keep dying young), drains on SIGTERM/SIGINT (each worker stops
accepting, finishes its calls in flight, exits) and on SIGHUP replaces the workers one by one,
each new one serving before its predecessor drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cluster.discovery import Registration
from .errors import InvalidAddress, PolyrpcError
from .stream.registry import registry

READY = "methods: "
"""The line a worker prints once it serves every URL (the serve command's last start-up line)."""
SERVING = "serving on "
"""The start of each line a worker prints for a URL it serves."""
STOP_TIMEOUT = 30.0
"""Seconds a draining worker may take before it is killed."""
YOUNG = 1.0
"""A worker that dies sooner than this after starting is restarted after a growing delay."""
MAX_RESTART_DELAY = 5.0


def add_option(url: str, name: str, value: str) -> str:
    """``url`` with ``name=value`` appended to its options."""
    return f"{url}{'&' if '?' in url else '?'}{name}={value}"


def without_options(url: str, names: set[str]) -> str:
    """``url`` without the named options (those the supervisor added)."""
    base, _, query = url.partition("?")
    kept = [pair for pair in query.split("&") if pair and pair.partition("=")[0] not in names]
    return f"{base}?{'&'.join(kept)}" if kept else base


ADDED_OPTIONS = {"reuse_port", "fd"}


def with_bound_port(url: str, bound: str) -> str:
    """``url`` (with its options) at the address of ``bound``, the URL a listener reports
    for it once bound (port 0 resolved; options left out)."""
    query = url.partition("?")[2]
    address = bound.partition("?")[0]
    return f"{address}?{query}" if query else address


def shareable_urls(urls: list[str]) -> tuple[list[str], list[socket.socket]]:
    """The URLs every worker listens on, and the unix sockets the supervisor holds for them.

    A transport with a port gets ``reuse_port=1``; a unix URL gets the file descriptor of a
    socket bound here (``fd=N``); anything else cannot be shared between processes."""
    shared: list[str] = []
    held: list[socket.socket] = []
    try:
        for url in urls:
            transport, address = registry.resolve(url)
            if "fd" in transport.options:  # unix: bound once, inherited by every worker
                path = address.target
                with contextlib.suppress(FileNotFoundError):
                    if Path(path).is_socket():
                        os.unlink(path)  # a stale socket file (a live server would be probed)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(path)
                sock.listen(1024)
                sock.set_inheritable(True)
                shared.append(add_option(url, "fd", str(sock.fileno())))
            elif "reuse_port" in transport.options:
                shared.append(add_option(url, "reuse_port", "1"))
            else:
                raise InvalidAddress(
                    f"{url}: the {transport.scheme} transport cannot share a listener between "
                    "processes; serve it with --workers 1"
                )
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return shared, held


@dataclass
class Worker:
    """One worker slot: its number, and the process serving it now."""

    number: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    early_deaths: int = 0
    replacing: bool = False
    """True while a SIGHUP replacement takes this slot's process away on purpose."""
    output: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Runs ``count`` workers of ``polyrpc serve`` with ``serve_args`` on ``urls``."""

    def __init__(
        self,
        urls: list[str],
        serve_args: list[str],
        count: int,
        held: list[socket.socket],
        register: tuple[str, float] | None = None,
    ) -> None:
        """``register``: (discovery URL, ttl) under which the group is registered, once."""
        self.register = register
        self.urls = urls
        self.serve_args = serve_args
        self.workers = [Worker(number) for number in range(count)]
        self.held = held
        self.stopping = False
        self._changed = asyncio.Event()
        self._bound = False
        self.ready_lines: list[str] = []
        """What worker 0 said once serving (its URLs, its methods), printed once all serve."""

    async def _start(self, worker: Worker) -> asyncio.subprocess.Process:
        """Start a process for ``worker``'s slot and wait until it serves; returns it."""
        command = [
            sys.executable,
            "-m",
            "polyrpc.cli",
            "serve",
            *self.urls,
            *self.serve_args,
            "--worker-id",
            str(worker.number),
        ]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,  # its end tells the worker the supervisor is gone
            stdout=asyncio.subprocess.PIPE,
            pass_fds=[sock.fileno() for sock in self.held],
        )
        assert process.stdout is not None
        bound: list[str] = []
        while True:
            line = (await process.stdout.readline()).decode(errors="replace")
            if not line:
                await process.wait()
                raise RuntimeError(
                    f"worker {worker.number} exited with status {process.returncode} before "
                    "serving (its errors are above)"
                )
            if line.startswith(SERVING):
                bound.append(line[len(SERVING) :].strip())
            elif line.startswith(READY):
                if not self._bound:  # worker 0's ports are everyone's from now on
                    self._bound = True
                    self.urls = [
                        with_bound_port(u, b) for u, b in zip(self.urls, bound, strict=True)
                    ]
                    self.ready_lines = [
                        *(f"{SERVING}{without_options(url, ADDED_OPTIONS)}" for url in bound),
                        line.rstrip(),
                    ]
                break
            else:
                print(f"[worker {worker.number}] {line.rstrip()}", flush=True)
        worker.output = asyncio.get_running_loop().create_task(self._relay(worker, process))
        worker.started = time.monotonic()
        return process

    async def _relay(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        """Print what a serving worker says, and note when it exits."""
        assert process.stdout is not None
        async for line in process.stdout:
            text = line.decode(errors="replace").rstrip()
            if text != "stopped":
                print(f"[worker {worker.number}] {text}", flush=True)
        await process.wait()
        self._changed.set()

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """Drain one worker: SIGTERM, then SIGKILL if it takes longer than STOP_TIMEOUT."""
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def replace_all(self) -> None:
        """SIGHUP: one by one, start a new worker, and once it serves drain the old one."""
        for worker in self.workers:
            if self.stopping:
                return
            old = worker.process
            worker.replacing = True
            try:
                worker.process = await self._start(worker)
            except RuntimeError as exc:
                print(f"polyrpc serve: restart of worker {worker.number} failed: {exc}", flush=True)
                worker.process = old
                worker.replacing = False
                continue
            if old is not None:
                await self._stop(old)
            worker.replacing = False
        print("workers restarted", flush=True)

    async def _restart_dead(self) -> None:
        """Start a new process in every slot whose process died (not drained on purpose)."""
        for worker in self.workers:
            process = worker.process
            if self.stopping or worker.replacing or process is None:
                continue
            if process.returncode is None:
                continue
            lived = time.monotonic() - worker.started
            worker.early_deaths = worker.early_deaths + 1 if lived < YOUNG else 0
            print(
                f"worker {worker.number} (pid {process.pid}) exited with status "
                f"{process.returncode}; restarting it",
                flush=True,
            )
            if worker.early_deaths:
                await asyncio.sleep(min(0.1 * 2**worker.early_deaths, MAX_RESTART_DELAY))
            try:
                worker.process = await self._start(worker)
            except RuntimeError as exc:
                print(f"polyrpc serve: {exc}", flush=True)
                worker.started = time.monotonic()
                self._changed.set()  # try again (after the growing delay)

    async def run(self) -> int:
        """Start the workers, keep them running until SIGTERM/SIGINT, then drain them."""
        loop = asyncio.get_running_loop()
        restarting: asyncio.Task[None] | None = None

        def stop() -> None:
            self.stopping = True
            self._changed.set()

        def restart() -> None:
            nonlocal restarting
            if self.ready_lines and (restarting is None or restarting.done()):
                restarting = loop.create_task(self.replace_all())

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, restart)
        try:
            for worker in self.workers:
                if self.stopping:
                    break
                worker.process = await self._start(worker)
        except RuntimeError as exc:
            print(f"polyrpc serve: {exc}", file=sys.stderr, flush=True)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop_all()
            self._close_held()
            return 1
        registration = None
        try:
            if self.register is not None:
                registration = await self._register(*self.register)
        except PolyrpcError as exc:
            print(f"polyrpc serve: {exc}", file=sys.stderr, flush=True)
            await self._stop_all()
            self._close_held()
            return 1
        for line in self.ready_lines:
            print(line, flush=True)
        try:
            while not self.stopping:
                await self._changed.wait()
                self._changed.clear()
                await self._restart_dead()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if restarting is not None:
                await restarting
            if registration is not None:  # clients stop choosing the group before it drains
                await registration.close()
            await self._stop_all()
            self._close_held()
        print("stopped", flush=True)
        return 0

    async def _register(self, url: str, ttl: float) -> Registration:
        """Register the URLs the workers serve, once for the whole group."""
        from .cluster.discovery import Instance, discovery_registry
        from .cluster.server import new_instance_id

        urls = tuple(without_options(u, ADDED_OPTIONS) for u in self.urls)
        instance = Instance(id=new_instance_id(), urls=urls, weight=len(self.workers), metadata={})
        registration = await discovery_registry.open(url).register(instance, ttl)
        print(f"registered at {url} as {instance.id}", flush=True)
        return registration

    async def _stop_all(self) -> None:
        self.stopping = True
        processes = [w.process for w in self.workers if w.process is not None]
        await asyncio.gather(*(self._stop(p) for p in processes))
        for worker in self.workers:
            if worker.output is not None:
                await worker.output

    def _close_held(self) -> None:
        """Close the unix sockets and remove their files (the workers have their copies)."""
        for sock in self.held:
            path = sock.getsockname()
            sock.close()
            if isinstance(path, str) and path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.held = []


def worker_count(text: str) -> int:
    """``--workers``: a whole number of at least 1, or ``auto`` (the CPU count)."""
    if text == "auto":
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"expected a number of workers or 'auto', got {text!r}") from None
    if count < 1:
        raise ValueError(f"--workers must be at least 1, got {count}")
    return count
