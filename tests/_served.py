"""Served teachers for the tests: ``kdkit lm serve`` in a thread (fast, in-process) or in a
process of its own (to kill -9 it), always on 127.0.0.1 with a free port, every wait bounded."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parents[1])  # the kdkit under test, not an installed one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_thread(scorer: Any, **options: Any):
    """``build_app(scorer, **options)`` served by uvicorn in a thread; yields ``(url, app)``."""
    import uvicorn

    from kdkit.lm.serve.server import build_app, listen

    app = build_app(scorer, **options)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class ServerProcess:
    """``python -m kdkit lm serve SOURCE --port PORT`` in a process; :meth:`kill` is SIGKILL."""

    def __init__(self, source: str, port: int | None = None, *args: str, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kdkit", "lm", "serve", source, "--port", str(self.port),
               "--threads", "1", *args]  # fmt: skip
        environ = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if "listening on" in line:
                return self
        self.kill()
        raise AssertionError(f"kdkit lm serve did not start: {''.join(seen)[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def tiny_scorer(teacher: Any, tokenizer: Any, **kwargs: Any) -> Any:
    from kdkit._fingerprint import module_fingerprint
    from kdkit.lm.models import freeze_teacher
    from kdkit.lm.serve.scorer import TeacherScorer

    freeze_teacher(teacher)
    return TeacherScorer(teacher, tokenizer, model="hf:tiny", engine="torch fp32",
                         weights_sha256=module_fingerprint(teacher), **kwargs)  # fmt: skip
