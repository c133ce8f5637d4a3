"""Real Flower processes on 127.0.0.1 for the tests: free ports, the environment they run in, a
run config as ``--run-config``'s text, the app bundle's files, and stopping a process group whole."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports on 127.0.0.1 that are free now (held open until all are known)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s") from None
            time.sleep(0.2)


def flower_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's scripts first on PATH, the tests importable (the tests'
    own Flower apps), Flower's telemetry and update check off, and ``extra``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    env |= {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env |= {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", "TOKENIZERS_PARALLELISM": "false"}
    return env | extra


def as_flag(config: dict[str, object]) -> str:
    """A run config as ``flwr run --run-config``'s text."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, int | float) else json.dumps(str(v))

    return " ".join(f"{k}={value(v)}" for k, v in config.items())


def stage_app(folder: Path) -> Path:
    """The app bundle's files (pyproject.toml and ``src/asymlora/**/*.py``, what its fab-include
    names) in ``folder``: ``flwr run`` walks every file under the folder it is given."""
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", folder)
    for path in (ROOT / "src" / "asymlora").rglob("*.py"):
        target = folder / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return folder


def start(args: list[str], log: Path, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """``args`` in a process group of its own, stdout and stderr to ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s whole process group (what it started: SuperExecs, tasks)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            os.killpg(proc.pid, 0)  # anything left in the group?
            time.sleep(1.0)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
