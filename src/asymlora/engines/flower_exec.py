"""A warm SuperExec for Flower's process isolation: imports torch, transformers and asymlora once,
then runs every ServerApp / ClientApp task in a forked child of that process.

Flower (1.42) runs each message in a fresh ``flwr-clientapp`` process (``flwr-serverapp`` for the
ServerApp), started by a SuperExec. Each such process imports torch and transformers again:
about 10 s of CPU per message, which dominates a round on a small model. Under
``--isolation process`` the SuperLink and SuperNodes leave the launching to an external
SuperExec; this module is one. It runs Flower's own SuperExec loop (``flower-superexec``) with
one change: a task is started by ``os.fork()`` of the already warm process, and the child runs
Flower's own entry point (``flwr-clientapp --token ...`` or ``flwr-serverapp --token ...``, the
same arguments the stock SuperExec passes), then exits. Every task still gets its own process,
and state between messages still goes through ``context.state`` as with the stock launcher.

Usage (one process can serve several runtime APIs: it forks one SuperExec per address)::

    flower-superlink --isolation process ...               # serves its runtime API on ADDR0
    flower-supernode --isolation process --port P1 ...     # runtime API on 127.0.0.1:P1
    python -m asymlora.engines.flower_exec --insecure ADDR0 127.0.0.1:P1 ...

With ``-- RUN [::: RUN]...`` the same process also submits ``flwr run RUN`` for each group, as
forks (``flwr run`` imports the app's module to check it: torch and transformers again, per
run, otherwise), waits for them, stops its SuperExecs and exits with the first failing status::

    python -m asymlora.engines.flower_exec --insecure ADDR0 ... -- APP_DIR local --stream --run-config "..."

``--preload MODEL`` also loads a model into the process (a module-level cache of
``asymlora.engines.flower``, keyed by model, dtype and device), which the forked tasks then
share copy-on-write: on the CPU (CUDA does not survive a fork), in ``--preload-dtype``, so it
serves runs whose config has that ``dtype`` and a device that is the CPU. The warm process
runs torch on one thread (OpenMP's pool does not survive a fork once used); each task gets
torch's default thread count back (the run config's ``num-threads`` sets it per task).

This reaches into two internals of flwr (checked against 1.42): the SuperExec loop looks up
``get_executor`` in ``flwr.supercore.superexec.run_superexec``, and exit handlers are kept in
``flwr.supercore.exit.exit_handler.registered_exit_handlers``. ``check_flwr`` fails with a clear
message if either has moved; ``scripts/flower_local.sh`` then needs ``FLOWER_ISOLATION=subprocess``
(Flower's stock launcher: slower, no internals).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from importlib.metadata import entry_points
from typing import Any

from ..models import DTYPE_CHOICES

# Warm the process: everything a task needs is imported before the first fork.
from . import flower as _app  # noqa: F401  (torch, transformers, asymlora, flwr.app)


def check_flwr() -> None:
    """Fail with one clear message where this flwr lacks the internals used here."""
    try:
        from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND  # noqa
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.superexec import run_superexec

        assert hasattr(run_superexec, "get_executor") and hasattr(run_superexec, "run_superexec")
        assert isinstance(exit_handler.registered_exit_handlers, list)
    except (ImportError, AssertionError) as err:
        raise RuntimeError(
            "asymlora.engines.flower_exec was written against flwr 1.42's SuperExec internals, "
            f"which this flwr lacks ({err!r}); use Flower's own launcher "
            "(--isolation subprocess, or FLOWER_ISOLATION=subprocess for scripts/flower_local.sh)"
        ) from None


def task_argv(spec: Any) -> list[str]:
    """The command line Flower's own ``SubprocessExecutor`` would run for ``spec``."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type]]
    args += [spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def _entry_point(command: str):
    found = entry_points(group="console_scripts", name=command)
    if not found:
        raise RuntimeError(f"no console script {command!r} in this environment (is flwr installed?)")
    return next(iter(found)).load()


def _forget_parent() -> None:
    """In a forked child: drop the SuperExec's signal and exit handlers (they close its
    connection and its executor, which belong to the parent)."""
    from flwr.supercore.exit import exit_handler

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    exit_handler.registered_exit_handlers.clear()


# OpenMP (torch's CPU thread pool) cannot be used in a forked child once the parent has run a
# parallel region; the warm process therefore computes single-threaded (``--preload``) and every
# forked task gets torch's default thread count back.
_THREADS = {"default": 0}


def single_threaded() -> None:
    """Before any torch work in the warm process: remember the default, run on one thread."""
    import torch

    if not _THREADS["default"]:
        _THREADS["default"] = torch.get_num_threads()
    torch.set_num_threads(1)


def run_forked(argv: list[str], quiet: bool) -> None:
    """The child's side of a launch: run Flower's entry point for ``argv``; never returns."""
    code = 1
    try:
        _forget_parent()
        if _THREADS["default"]:
            import torch

            torch.set_num_threads(_THREADS["default"])
        if quiet:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        main = _entry_point(argv[0])
        sys.argv = list(argv)
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, then leave with an error code
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkExecutor:
    """Flower's ``Executor`` protocol (the subprocess executor's behaviour) with ``os.fork``."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return supported_task_types, set()

    def wait_for_capacity(
        self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None
    ):
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor import LaunchResult

        argv = task_argv(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_forked(argv, spec.suppress_output)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Stop the children still running (only in the process that forked them)."""
        if os.getpid() != self.owner:
            return
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.children.clear()


def superexec(address: str, flags: list[str]) -> None:
    """Flower's SuperExec loop on ``address`` with the forking executor; never returns."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec

    run_superexec.get_executor = lambda *args, **kwargs: ForkExecutor()
    sys.argv = ["flower-superexec", "--runtime-api-address", address, *flags]
    flower_superexec()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """The options, and the ``flwr run`` argument groups after ``--`` (separated by ``:::``)."""
    runs: list[list[str]] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
        runs = [[]]
        for arg in rest:
            if arg == ":::":
                runs.append([])
            else:
                runs[-1].append(arg)
    parser = argparse.ArgumentParser(
        prog="python -m asymlora.engines.flower_exec",
        description="A warm SuperExec (fork per task) for SuperLinks/SuperNodes run with "
        "--isolation process; with `-- RUN [::: RUN]...` it also submits those `flwr run`s "
        "(from the same warm process) and exits when they have ended.",
    )
    parser.add_argument("addresses", nargs="+", help="runtime API addresses (host:port) to serve")
    parser.add_argument("--insecure", action="store_true", help="connect to the runtime APIs without TLS")
    parser.add_argument("--root-certificates", help="CA certificate of the runtime APIs (TLS)")
    parser.add_argument("--preload", default="", help="a model name to load (on the CPU) before forking")
    parser.add_argument(
        "--preload-dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="the preloaded model's dtype (the runs' dtype)",
    )
    return parser.parse_args(argv), [r for r in runs if r]


def fork(target: Any, *args: Any) -> int:
    """A child process running ``target(*args)`` (which should not return)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        finally:
            os._exit(1)
    return pid


def wait_for(addresses: list[str], timeout: float = 120.0) -> None:
    """Until every ``host:port`` accepts TCP connections (this process may start before them)."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        host, _, port = address.rpartition(":")
        while True:
            try:
                socket.create_connection((host.strip("[]"), int(port)), 1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"nothing listens on {address} after {timeout:g} s") from None
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    args, runs = parse_args(sys.argv[1:] if argv is None else argv)
    check_flwr()
    single_threaded()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads across forks
    if args.preload:
        _app.base_model(_app.base_key(args.preload, args.preload_dtype, "cpu"))
    if runs:
        import flwr.cli.app  # noqa: F401  (warm: `flwr run` imports it)
    wait_for(args.addresses)
    flags = ["--insecure"] if args.insecure else []
    if args.root_certificates:
        flags += ["--root-certificates", args.root_certificates]
    if len(args.addresses) == 1 and not runs:
        superexec(args.addresses[0], flags)
        return
    flags += ["--parent-pid", str(os.getpid())]  # each SuperExec ends when this process does
    servers = [fork(superexec, address, flags) for address in args.addresses]
    clients = [fork(run_forked, ["flwr", "run", *run], False) for run in runs]

    def stop(signum: int, _frame: Any) -> None:
        for pid in servers + clients:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    for pid in clients or servers:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        status = status or code
    if clients:
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in servers:
            os.waitpid(pid, 0)
    raise SystemExit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
