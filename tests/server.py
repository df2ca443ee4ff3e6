"""A real tandem server in a subprocess on a free loopback port, for the service tests.

`Server(data_dir, models_dir, *flags)` starts `python -m service.cli serve ...`; `stop()` sends
SIGTERM (or SIGKILL) and returns the exit code. The session-scoped `server` fixture serves
tests/test_service.py and tests/test_prometheus.py; tests that restart a server start their own.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Small limits so that the tests can reach them with small requests.
TEST_FLAGS = (
    "--max-batch-points", "64",
    "--max-batch-searches", "8",
    "--max-body-bytes", str(2**20),
    "--max-line-bytes", "4096",
    "--ingest-chunk-points", "100",
)


#: Every server started in this process, so that one a failed test left running dies with the tests.
_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, models_dir: Path, *flags: str, env: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.flags = flags
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or data_dir.parent) / f"{data_dir.name}-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 90.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
        env.update(self.env)
        cmd = [
            sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--models-dir", str(self.models_dir), *self.flags,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child until stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _STARTED.append(self.proc)
        log.close()
        self.wait("/readyz" if wait_ready else "/livez", timeout)
        return self

    def wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not answering {path} after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not stop within {timeout} s") from None
        return int(self.proc.returncode)

    def stop_cleanly(self, timeout: float = 60.0) -> None:
        """SIGTERM, then check that the lifespan's shutdown ran (collections closed).

        uvicorn re-raises the signal once it has shut down gracefully, so the exit status is
        -SIGTERM rather than 0; the log tells a graceful stop from a kill.
        """
        code = self.stop(signal.SIGTERM, timeout)
        log = self.log()
        assert code in (0, -signal.SIGTERM), f"server exited with {code}:\n{log[-3000:]}"
        assert "Application shutdown complete" in log, log[-3000:]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]  # passthrough

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def models_dir(onnx_model_dir: Path) -> Path:
    return onnx_model_dir.parent


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("service") / "data", models_dir, *TEST_FLAGS).start()
    yield srv
    srv.stop_cleanly()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
