"""Start and stop the processes of a pipeline: simulated provider and faust workers.

`llmflow up` and the integration tests share this, so the tests run the same processes a
person runs. Brokers and Redis come from `llmflow.brokers`; each process is stopped by its
own handle.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from llmflow.brokers import Managed, free_port
from topology.settings import Settings, to_env

PROVIDER_LINE = re.compile(r"listening on (http://\S+)")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Terminate, then kill what is still running after `timeout`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def fixed_latency(latency_ms: float) -> list[str]:
    """The simulated provider's arguments for `latency_ms` on every call, no jitter: what
    benchmarks compare systems on."""
    return ["--latency-ms", str(latency_ms), "--latency-jitter-ms", "0"]


class SimulatedProvider:
    """The simulated OpenAI-compatible provider as a child process."""

    def __init__(self, run_dir: Path, args: list[str] | None = None) -> None:
        self.run_dir = run_dir
        self.args = args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self) -> str:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / "provider.log"
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "provider.simulated", "--port", "0", *self.args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = PROVIDER_LINE.search(log.read_text(errors="replace"))
            if match:
                self.base_url = match.group(1)
                return f"{self.base_url}/v1"
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"simulated provider did not start:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class Workers(Managed):
    """`count` faust workers of one pipeline, each with its own data dir and metrics port,
    logging at `loglevel` to `worker-N.log` in `run_dir`; `command` starts another kind of
    worker with the same settings."""

    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        count: int = 1,
        loglevel: str = "WARNING",
        command: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.count = count
        self.command = command or [
            sys.executable,
            "-m",
            "llmflow.cli",
            "worker",
            "--loglevel",
            loglevel,
        ]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.metrics_ports: list[int] = []
        self.started = 0

    def start_one(self) -> subprocess.Popen[bytes]:
        index = self.started
        self.started += 1
        port = free_port()
        settings = self.settings.model_copy(
            update={"metrics_port": port, "data_dir": str(self.run_dir / f"worker-{index}")}
        )
        env = {**os.environ, **to_env(settings), "PYTHONUNBUFFERED": "1"}
        with (self.run_dir / f"worker-{index}.log").open("wb") as log:
            process = subprocess.Popen(
                self.command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        self.metrics_ports.append(port)
        return process

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(self.count):
            self.start_one()

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.processes]

    def stop(self) -> None:
        """Stop every worker; a later `start` begins a fresh set (new logs, new ports)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            stop_process(process)
        self.processes.clear()
        self.metrics_ports.clear()
