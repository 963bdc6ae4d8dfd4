"""A SuperNode's ClientApp processes, forked from one warm process instead of started from scratch.

Flower 1.41 runs every message a SuperNode receives in a new ``flwr-clientapp`` process (its
SuperExec polls the node's Runtime API for tasks and starts one process per task). Each of them
imports torch and Flower again: about 2.5 s on a 2-core machine, plus torch's first-call costs,
for a client update that takes milliseconds. Flower 1.41 has no long-lived ClientApp (its warm
executor pools are for Kubernetes agent apps only), but it lets an operator run the SuperExec side
themselves (``flower-supernode --isolation process``) and its executor is a small protocol
(``flwr.supercore.superexec.executor.types.Executor``).

This module is that SuperExec, with Flower's own loop (``run_superexec``) and one change: the
executor. It imports the ClientApp's heavy dependencies once (torch, numpy, Flower's ClientApp
runtime; never the app itself), then for each task **forks** a child that runs Flower's own
``run_clientapp``, exactly what ``flwr-clientapp`` runs. Each message still gets its own process
(a crash or a leak stays in it, as with Flower's default), started in milliseconds. The app's code
is the submitted bundle's, as before: the child imports ``fedmaml`` afresh from the bundle that
``run_clientapp`` installs (this process's own ``fedmaml`` modules are dropped in the child first).

Usage (what ``fedmaml deploy supernode`` starts next to ``flower-supernode --isolation process``)::

    python -m fedmaml.deploy.warm_clientapps --runtime-api-address 127.0.0.1:9094 --insecure \\
        --parent-pid <SuperNode PID>

Task polling: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's variable, default 1 s); this
module's default is :data:`TASK_POLL_SECONDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

#: How often the executor asks the local SuperNode for a task (Flower's default: 1 s). A local HTTP
#: call; 20 per second cost well under 1 % of a core.
TASK_POLL_SECONDS = "0.05"
#: What every fedmaml ClientApp imports, loaded once in the warm process (not fedmaml itself: the
#: app's code comes from the submitted bundle).
PRELOAD = ("numpy", "torch", "yaml", "flwr.app", "flwr.clientapp",
           "flwr.supernode.runtime.run_clientapp")
#: Top-level packages dropped from a child's module table before it loads the submitted app.
APP_PACKAGES = ("fedmaml",)


def _drop_app_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]


class ForkExecutor:
    """Flower's ``Executor`` protocol: a ClientApp task runs in a child forked from this process;
    any other task type is started as Flower would (a subprocess)."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False,
                              root_certificates_path=None):
        return self.fallback.get_eligible_capacity(supported_task_types, insecure=insecure,
                                                   root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False,
                          root_certificates_path=None) -> None:
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        self.reconcile()
        pid = os.fork()
        if pid == 0:  # the child: what `flwr-clientapp --token ...` does, minus the imports
            os._exit(_run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the children that have finished."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def _run_task(spec) -> int:
    import time

    code, start = 1, time.perf_counter()
    try:
        _drop_app_modules()
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token,
                      insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(
                          spec.root_certificates_path, spec.insecure),
                      parent_pid=spec.parent_pid,
                      runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as e:  # run_clientapp ends with flwr_exit(code)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never return into the parent's loop
        traceback.print_exc()
    finally:
        app = sys.modules.get("fedmaml")  # the submitted bundle's package, once loaded
        where = f", app {Path(app.__file__).parent.parent}" if app and app.__file__ else ""
        print(f"fedmaml: ClientApp task {spec.task_id} ran in {time.perf_counter() - start:.2f}s "
              f"(forked, exit code {code}{where})", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates", default=None)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = p.parse_args(argv)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_SECONDS)

    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    run = importlib.import_module("flwr.supercore.superexec.run_superexec")
    # Flower's loop with this executor: run_superexec builds its executor with get_executor().
    run.get_executor = lambda *a, **k: ForkExecutor()
    run.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                      root_certificates_path=args.root_certificates, parent_pid=args.parent_pid,
                      runtime_dependency_install=False)


if __name__ == "__main__":
    main()
