"""Per-round latency of a deployed federation on localhost, against the same run simulated
(docs/deployment.md, "Costs").

A SuperLink (TLS, node authentication, the split fleet/control sockets of ``fedmaml deploy
superlink``) and three SuperNodes on this machine, each started with ``fedmaml deploy supernode``;
the run is submitted with ``fedmaml deploy submit`` from a directory outside the project. Per mode:

* **warm** (the default of ``fedmaml deploy supernode``): ClientApp processes forked from a process
  that has torch and Flower loaded (fedmaml/deploy/warm_clientapps.py);
* **cold** (``--cold-clientapps``): Flower's default, every message in a new process started from
  scratch.

A round's latency is the difference of consecutive ``seconds`` stamps in the run's metrics.jsonl
(stamped by the ServerApp after each round). Training-only rounds (1 .. R-1) are summarised by
their median; round R also evaluates every client (one more exchange), round 0 only evaluates.
The same config run in-process gives the simulated round. Flower's fixed poll intervals in 1.41
(hard-coded in ``flwr/supernode/start_client_internal.py``): a SuperNode that found no message
sleeps 3 s before asking again, and waits for its ClientApp's reply in 0.5 s steps; so a round costs
up to 3.5 s of polling whatever fedmaml does. Target: warm round <= 2 x (simulated round + 3.5 s).

    PYTHONPATH=. .venv/bin/python simulations/benchmarks/deploy_latency.py --out latency.json

Output: ``{"config", "simulated_round_s", "flower_poll_s", "modes": {mode: {"train_round_s"
(median), "rounds_s" (every round), "client_compute_s" (slowest client's training per round,
median), "run_s" (submit to completed), "node_setup_s"}}, "target": {...}, "load"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fedmaml
from fedmaml.config import load_config
from fedmaml.deploy import processes
from fedmaml.deploy.runs import flwr
from fedmaml.experiment import run_experiment
from fedmaml.provenance import with_provenance
from fedmaml.results.recorder import read_metrics

# The docs' walk-through config (docs/deployment.md, step 2): three devices, LocalMOML, MLP 40-40.
CONFIG = """\
name: latency
seed: 0
data: {{family: sinusoid, num_clients: 3}}
model: {{name: mlp, hidden: [40, 40]}}
algorithm: {{name: moml, local_steps: 5, support_size: 5}}
federated: {{mode: cross_silo, rounds: {rounds}, eval_every: 0, round_timeout: 120}}
output_dir: {out}
"""
FLOWER_POLL_S = 3.0 + 0.5  # SuperNode idle poll + reply poll (flwr 1.41)
NODES = 3


def _fedmaml(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmaml", *args]


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(_fedmaml(*args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"fedmaml {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def deployed(mode: str, rounds: int, root: Path) -> dict:
    """Start a federation, submit the config, return its timings; every process stopped by PID."""
    # The processes run elsewhere: give them this fedmaml by an absolute path.
    here = str(Path(fedmaml.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "FLWR_HOME": str(root / "cli-home"), "PYTHONUNBUFFERED": "1",
           "FLWR_LOG_LEVEL": "INFO",  # the SuperNode ID line tells that a node is in
           "PYTHONPATH": path}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a device caches the bundle's bytecode
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        _cli(["deploy", "certs", str(root / "certs")], env, root)
        _cli(["deploy", "keys", str(root / "keys"), *[f"node-{i}" for i in range(NODES)]], env, root)
        fleet, control = processes.free_port(), processes.free_port()
        procs.append(processes.start(
            _fedmaml("deploy", "superlink", "--certs", str(root / "certs"), "--host", "127.0.0.1",
                     "--port", str(fleet), "--control-port", str(control)),
            root / "superlink.log", env={**env, "FLWR_HOME": str(root / "home-superlink")},
            cwd=root))
        processes.wait_until(lambda: processes.port_open("127.0.0.1", control), 60, "SuperLink",
                             process=procs[-1], name="the SuperLink",
                             log=root / "superlink.log")
        _cli(["deploy", "connection", "lab", "--address", f"127.0.0.1:{control}", "--ca",
              str(root / "certs" / "ca.crt"), "--default"], env, root)
        for i in range(NODES):
            flwr(["supernode", "register", str(root / "keys" / f"node-{i}.pub"), "lab"],
                 home=root / "cli-home")
        for i in range(NODES):
            args = ["deploy", "supernode", "--superlink", f"127.0.0.1:{fleet}", "--ca",
                    str(root / "certs" / "ca.crt"), "--key", str(root / "keys" / f"node-{i}"),
                    "--partition-id", str(i), "--num-partitions", str(NODES), "--port",
                    str(processes.free_port()), "--home", str(root / f"home-{i}")]
            if mode == "cold":
                args.append("--cold-clientapps")
            procs.append(processes.start(_fedmaml(*args), root / f"node-{i}.log", env=env,
                                         cwd=root))
        for i in range(NODES):
            processes.wait_until(lambda i=i: "SuperNode ID" in (root / f"node-{i}.log").read_text(
                errors="replace"), 120, f"node {i}", process=procs[1 + i], name=f"node {i}",
                log=root / f"node-{i}.log")
        setup_s = time.monotonic() - t0
        (root / "cfg.yaml").write_text(CONFIG.format(rounds=rounds, out=root / "runs"))
        elsewhere = root / "elsewhere"  # not the project directory: the README's command as written
        elsewhere.mkdir()
        t1 = time.monotonic()
        out = _cli(["deploy", "submit", str(root / "cfg.yaml"), "--connection", "lab"], env,
                   elsewhere)
        run_s = time.monotonic() - t1
        run_dir = next((root / "runs").glob("latency-*/metrics.jsonl")).parent
        rows = read_metrics(run_dir)
        assert "finished:completed" in out, out
        # Warm mode logs each ClientApp process's life (fork to exit): fedmaml's share of a round.
        tasks = [float(t) for i in range(NODES) for t in re.findall(
            r"ClientApp task \d+ ran in ([0-9.]+)s", (root / f"node-{i}.log").read_text())]
        out = {"node_setup_s": round(setup_s, 2), "run_s": round(run_s, 2), **_round_times(rows)}
        if tasks:
            out["clientapp_task_s"] = round(statistics.median(tasks), 3)
        return out
    finally:
        for proc in reversed(procs):
            processes.stop(proc)


def _round_times(rows: list[dict]) -> dict:
    stamps = [r["seconds"] for r in rows]
    per_round = [b - a for a, b in zip(stamps, stamps[1:])]  # rounds 1..R
    train_only = per_round[:-1] or per_round
    compute = [r["train_seconds_max"] for r in rows if "train_seconds_max" in r]
    return {"train_round_s": round(statistics.median(train_only), 3),
            "rounds_s": [round(x, 3) for x in per_round],
            "round0_s": round(stamps[0], 3),
            "client_compute_s": round(statistics.median(compute), 4)}


def simulated(rounds: int, root: Path) -> dict:
    (root / "sim.yaml").write_text(CONFIG.format(rounds=rounds, out=root / "sim-runs"))
    cfg = load_config(root / "sim.yaml", [])
    return _round_times(read_metrics(run_experiment(cfg, quiet=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--modes", default="warm,cold", help="comma-separated: warm, cold")
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--workdir", help="keep certificates, logs and runs here (default: a temporary "
                   "directory, deleted)")
    a = p.parse_args(argv)
    load = [list(os.getloadavg())]
    with tempfile.TemporaryDirectory(prefix="deploy-latency-") as tmp:
        root = Path(a.workdir).resolve() if a.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        sim = simulated(a.rounds, root)
        modes = {}
        for mode in a.modes.split(","):
            (root / mode).mkdir()
            modes[mode] = deployed(mode, a.rounds, root / mode)
            load.append(list(os.getloadavg()))
            print(f"{mode}: {modes[mode]}", file=sys.stderr, flush=True)
    bound = 2 * (sim["train_round_s"] + FLOWER_POLL_S)
    result = {"config": CONFIG.format(rounds=a.rounds, out="<tmp>"), "simulated_round_s":
              sim["train_round_s"], "simulated": sim, "flower_poll_s": FLOWER_POLL_S,
              "modes": modes, "target": {"bound_s": round(bound, 3), "met": {
                  m: v["train_round_s"] <= bound for m, v in modes.items()}},
              "load": [[round(x, 2) for x in l] for l in load], "cpus": os.cpu_count()}
    text = json.dumps(with_provenance(result), indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from fedmaml.cli import run_command  # Ctrl-C: "interrupted", exit 130, no traceback

    raise SystemExit(run_command(main))
