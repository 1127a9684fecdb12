"""Helpers for the server tests: start ``llava_voco.serve.server`` as a subprocess on a free loopback port."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 120
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


class RunningServer:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.base_url = f"http://127.0.0.1:{port}"

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by their full name (labels included), from ``GET /metrics``."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            match = re.match(r"^([^#\s][^\s]*) ([0-9.eE+-]+|NaN|\+Inf)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_server(model_dir, tmp_path: Path, *extra: str, env: dict | None = None):
    """A server on 127.0.0.1 (the default bind); stopped, and its log shown on failure, at exit."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
                   **(env or {})}
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "llava_voco.serve.server", "--model-path", str(model_dir), "--port", str(port),
             "--log-level", "warning", "--threads", "1", *extra],
            stdout=handle, stderr=subprocess.STDOUT, env=environment,
        )
    server = RunningServer(process, port, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_text()[-3000:]}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health in {STARTUP_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
