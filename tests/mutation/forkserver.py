"""A pytest fork server: torch, triton and pytest imported once, one forked child per test run.

Mutation testing runs the same few tests once per mutant; importing torch and triton costs more
than most of those runs. The server imports the third-party libraries (never flashsae or the
tests, which the mutants change on disk) and, for each request on its Unix socket, forks a child
that runs ``pytest.main(args)`` in the server's directory and exits with its status. The client is
what mutmut runs as its test command: it forwards its arguments and exits with the child's status
mapped to what mutmut reads (1: a test failed or could not be collected, the mutant is killed;
0: the tests passed). When the client dies (mutmut's timeout kills it) the child's process group
is killed too.

    python -m tests.mutation.forkserver serve SOCKET
    python -m tests.mutation.forkserver client SOCKET -- PYTEST_ARGS...
"""
from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys

# Imported before forking: everything the tests need that no mutant touches (and every pytest plugin,
# see `_preload`).
PRELOAD = ("numpy", "torch", "triton", "triton.language", "pytest", "safetensors.torch")


def _run_child(args: list[str], log: str) -> None:
    """In the forked child: a process group of its own, output to ``log``, pytest, then exit."""
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    status = 3
    try:
        import pytest

        # The plugins were imported before pytest could rewrite their asserts; that is fine here.
        status = int(pytest.main(["-W", "ignore::pytest.PytestAssertRewriteWarning", *args]))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _serve_one(conn: socket.socket) -> None:
    request = json.loads(conn.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_child(request["args"], request["log"])
    watch = selectors.DefaultSelector()
    watch.register(conn, selectors.EVENT_READ)
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        if watch.select(timeout=0.05) and not conn.recv(1):  # the client is gone: stop the run
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
    conn.sendall(f"{status}\n".encode())


def _preload() -> None:
    """Import PRELOAD and the installed pytest plugins: a plugin imported by pytest itself has its
    asserts rewritten first, which costs more than most test runs."""
    from importlib.metadata import entry_points

    for name in PRELOAD:
        __import__(name)
    for plugin in entry_points(group="pytest11"):
        plugin.load()
    gc.freeze()  # the children's collections (pytest runs several) skip the preloaded objects


def serve(path: str) -> None:
    """Preload, listen on ``path`` and serve one run at a time until killed."""
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                _serve_one(conn)
            except (BrokenPipeError, ConnectionResetError, json.JSONDecodeError):
                pass


def client(path: str, args: list[str]) -> int:
    """Run pytest with ``args`` on the server at ``path``; 1 if it failed in any way, 0 if it passed."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    log = os.environ.get("FLASHSAE_MUTATION_LOG", os.devnull)
    conn.sendall((json.dumps({"args": args, "log": log}) + "\n").encode())
    reply = conn.makefile("r").readline().strip()
    # pytest: 0 passed; anything else is a failure, a collection error, a crash or (5) an empty
    # selection, which fails the baseline run that mutmut makes first.
    return 0 if reply == "0" else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(argv[1])
        return 0
    if len(argv) >= 3 and argv[0] == "client" and argv[2] == "--":
        return client(argv[1], argv[3:])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
