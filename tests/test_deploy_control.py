"""Who controls a deployed federation: the operator only (docs/deployment.md, "Security").

Fast checks: the SuperLink's command line keeps the Control API on this machine unless told
otherwise (and warns then); the app that ``fedmaml deploy submit`` stages is the project's Flower
app, valid for Flower, from any directory.

With real processes (marked ``deployment``): a SuperLink whose fleet socket listens on a
non-loopback address, and a second network namespace (``ip netns``, a machine of its own for the
network) standing for another host on the LAN. From there, the Control API's port does not answer,
and registering a node key or submitting a run is refused on every port; a SuperNode there still
joins through the fleet socket, and the operator on the SuperLink's machine registers it and runs
an experiment with ``fedmaml deploy submit`` from a directory outside the project. A SuperNode that
trusts only signed apps (Flower's ``--trusted-entities``) refuses the unsigned run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedmaml.cli import main
from fedmaml.deploy import processes
from fedmaml.deploy.app_bundle import pyproject_text, staged_app
from fedmaml.deploy.commands import program, program_env, superlink_argv
from fedmaml.deploy.crypto import DeployError, make_certificates
from fedmaml.deploy.flwr_config import write_connection
from fedmaml.deploy.runs import flwr, flwr_env
from fedmaml.results.recorder import read_metrics

REPO = Path(__file__).resolve().parents[1]


# -- command lines and the staged app ---------------------------------------------------------------

def test_control_api_stays_on_this_machine_by_default(tmp_path, capsys):
    c = make_certificates(tmp_path / "certs")
    argv = superlink_argv(c.directory)
    assert argv[1:3] == ["-m", "fedmaml.deploy.superlink_server"]
    assert argv[argv.index("--fleet-host") + 1] == "0.0.0.0"  # devices: every interface
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # flwr: this machine only
    assert argv[argv.index("--fleet-port") + 1] == "9092" and argv[argv.index("--port") + 1] == "9093"
    with pytest.raises(DeployError, match="must differ"):
        superlink_argv(c.directory, host="127.0.0.1", port=9093)
    assert main(["deploy", "superlink", "--certs", str(c.directory), "--dry-run"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert main(["deploy", "superlink", "--certs", str(c.directory), "--control-host", "0.0.0.0",
                 "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--host 0.0.0.0" in out and "WARNING: the Control API listens on 0.0.0.0" in err


def test_staged_app_is_the_projects_flower_app_from_anywhere(tmp_path, monkeypatch):
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["tool"]["flwr"]["app"]
    staged = tomllib.loads(pyproject_text())
    assert staged["tool"]["flwr"]["app"] == project  # publisher, fab-include, components, config
    monkeypatch.chdir(tmp_path)  # not the project directory
    with staged_app() as app:
        assert app.name == "fedmaml"
        ok, errors, warnings = validate_config(tomllib.loads((app / "pyproject.toml").read_text()),
                                               check_module=True, project_dir=app)
        assert ok and not warnings, (errors, warnings)
        import io
        import zipfile

        names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
        assert "pyproject.toml" in names and "fedmaml/federated/client_app.py" in names
        assert all(n.endswith(".py") for n in names if n.startswith("fedmaml/"))
    assert not app.exists()


# -- real processes in two network namespaces -------------------------------------------------------

def _netns_works() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0 or os.environ.get(
            "FEDMAML_SKIP_DEPLOYMENT") == "1":
        return False
    probe = f"fmprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


needs_netns = pytest.mark.skipif(not _netns_works(), reason="needs root and `ip netns` "
                                 "(or FEDMAML_SKIP_DEPLOYMENT=1)")


class OtherHost:
    """A network namespace joined to this one by a veth pair: ``self.address`` is this machine's
    address as the other host sees it, ``self.peer`` the other host's."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.name, self.veth = f"fmns{tag}", f"fmv{tag}"
        a, b = random.randrange(16, 250), random.randrange(0, 250, 4)
        self.address, self.peer = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        ip = ["ip"]
        steps = [ip + ["netns", "add", self.name],
                 ip + ["link", "add", self.veth + "h", "type", "veth", "peer", "name",
                       self.veth + "n"],
                 ip + ["link", "set", self.veth + "n", "netns", self.name],
                 ip + ["addr", "add", f"{self.address}/30", "dev", self.veth + "h"],
                 ip + ["link", "set", self.veth + "h", "up"],
                 self.run_argv(ip + ["addr", "add", f"{self.peer}/30", "dev", self.veth + "n"]),
                 self.run_argv(ip + ["link", "set", self.veth + "n", "up"]),
                 self.run_argv(ip + ["link", "set", "lo", "up"])]
        for argv in steps:
            subprocess.run(argv, check=True, capture_output=True)

    def run_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:  # deleting the namespace deletes the veth pair
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _flwr_there(host: OtherHost, args: list[str], home: Path) -> tuple[int, str]:
    done = subprocess.run(host.run_argv([program("flwr"), *args, "--format", "json"]),
                          capture_output=True, text=True, env=flwr_env(home), timeout=120)
    return done.returncode, done.stdout + done.stderr


def _answer(output: str) -> dict:
    start = output.find("{")
    return json.loads(output[start:]) if start >= 0 else {}


def _fedmaml(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmaml", *args]


CONFIG = """\
name: control
seed: 1
data: {{family: sinusoid, num_clients: 1, eval_adapt_size: 5, eval_heldout_size: 10}}
model: {{hidden: [8]}}
algorithm: {{name: moml, local_steps: 1, support_size: 4}}
federated: {{mode: cross_silo, rounds: 1, eval_every: 0, round_timeout: 60}}
evaluation: {{steps: 1}}
output_dir: {out}
"""


@needs_netns
@pytest.mark.deployment
@pytest.mark.slow
def test_only_the_operator_controls_the_federation(tmp_path, monkeypatch, capsys):
    env = {**program_env(), "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1"}
    there, procs = OtherHost(), []
    try:
        assert main(["deploy", "certs", str(tmp_path / "certs"), "--host", there.address]) == 0
        assert main(["deploy", "keys", str(tmp_path / "keys"), "device", "intruder"]) == 0
        ca, keys = tmp_path / "certs" / "ca.crt", tmp_path / "keys"
        fleet, control = processes.free_port(), processes.free_port()
        procs.append(processes.start(
            _fedmaml("deploy", "superlink", "--certs", str(tmp_path / "certs"), "--host",
                     there.address, "--port", str(fleet), "--control-port", str(control)),
            tmp_path / "superlink.log", env={**env, "FLWR_HOME": str(tmp_path / "home-link")},
            cwd=tmp_path))
        processes.wait_until(lambda: processes.port_open("127.0.0.1", control), 180, "SuperLink",
                             process=procs[-1], name="the SuperLink",
                             log=tmp_path / "superlink.log")

        # The other host: the control port does not answer at all...
        probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])),"
                 " timeout=3)\nexcept OSError as e:\n print(type(e).__name__); sys.exit(1)")
        for port, reachable in ((control, False), (fleet, True)):
            done = subprocess.run(there.run_argv([sys.executable, "-c", probe, there.address,
                                                  str(port)]), capture_output=True, text=True)
            assert (done.returncode == 0) == reachable, (port, done.stdout, done.stderr)
        assert "ConnectionRefusedError" in subprocess.run(
            there.run_argv([sys.executable, "-c", probe, there.address, str(control)]),
            capture_output=True, text=True).stdout
        # ... and the fleet port refuses the Control API: no key registered, no run submitted.
        far, refusals = tmp_path / "home-there", {}
        for name, port in (("direct", control), ("via-fleet", fleet)):
            write_connection(name, f"{there.address}:{port}", ca, home=far)
            _, out = _flwr_there(there, ["supernode", "register", str(keys / "intruder.pub"),
                                         name], far)
            refusals[f"register, {name}"] = _answer(out)
            with staged_app() as app:
                _, out = _flwr_there(there, ["run", str(app), name], far)
            refusals[f"run, {name}"] = _answer(out)
        (tmp_path / "refusals.json").write_text(json.dumps(refusals, indent=1))  # for a reader
        for what, answer in refusals.items():  # flwr --format json exits 0 either way
            assert answer.get("success") is False, (what, answer)
        for what in ("register, direct", "run, direct"):
            assert "Connection to the SuperLink is unavailable" in refusals[what]["error-message"]
        for what in ("register, via-fleet", "run, via-fleet"):
            assert "403 Forbidden" in refusals[what]["error-message"]

        # The operator, on the SuperLink's machine: registers the device, which joins from the other
        # host through the fleet socket (the intruder's key stayed unregistered).
        home = tmp_path / "home-op"
        write_connection("op", f"127.0.0.1:{control}", ca, default=True, home=home,
                         token_file=tmp_path / "certs" / "operator.token")
        device_id = int(flwr(["supernode", "register", str(keys / "device.pub"), "op"],
                             home=home)["node-id"])
        procs.append(processes.start(there.run_argv(_fedmaml(
            "deploy", "supernode", "--superlink", f"{there.address}:{fleet}", "--ca", str(ca),
            "--key", str(keys / "device"), "--partition-id", "0", "--port",
            str(processes.free_port()), "--home", str(tmp_path / "home-device"))),
            tmp_path / "device.log", env=env, cwd=tmp_path))
        processes.wait_until(lambda: f"SuperNode ID: {device_id}" in (
            tmp_path / "device.log").read_text(errors="replace"), 120, "the device to join",
            process=procs[-1], name="the device's SuperNode", log=tmp_path / "device.log")
        nodes = flwr(["supernode", "ls", "op"], home=home)["nodes"]
        assert [int(n["node-id"]) for n in nodes] == [device_id]
        assert flwr(["ls", "op"], home=home).get("runs", []) == []  # nothing was submitted

        # The README's command, from a directory that is not the project's.
        (tmp_path / "exp.yaml").write_text(CONFIG.format(out=tmp_path / "runs"))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        monkeypatch.setenv("FLWR_HOME", str(home))
        capsys.readouterr()
        assert main(["deploy", "submit", str(tmp_path / "exp.yaml"), "--connection", "op",
                     "--timeout", "240"]) == 0
        assert "finished:completed" in capsys.readouterr().out
        [run_dir] = (tmp_path / "runs").glob("control-*")
        rows = read_metrics(run_dir)
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["replies"] == 1
        # The device ran the submitted bundle (installed under its FLWR_HOME), not its own fedmaml,
        # each message in a process forked from the warm one.
        apps = re.findall(r"ClientApp task \d+ ran in [0-9.]+s \(forked, exit code 0, app (\S+)\)",
                          (tmp_path / "device.log").read_text())
        assert apps and all(a.startswith(str(tmp_path / "home-device")) for a in apps), apps
    finally:
        for proc in reversed(procs):
            processes.stop(proc)
        there.close()
    for proc in procs:
        assert proc.poll() is not None


@needs_netns
@pytest.mark.deployment
@pytest.mark.slow
def test_a_node_that_trusts_only_signed_apps_refuses_an_unsigned_run(tmp_path):
    """Flower 1.41's app verification (``--trusted-entities``): FABs carry signatures only when the
    SuperLink fetched them from Flower Hub; a bundle submitted with ``flwr run <dir>`` has none, so
    the node replies with an error instead of running it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    (tmp_path / "trusted.yaml").write_text(f"fpk_lab: '{key}'\n")
    env = {**program_env(), "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1"}
    procs = []
    try:
        fleet, control = processes.free_port(), processes.free_port()
        procs.append(processes.start(_fedmaml(
            "deploy", "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(fleet),
            "--control-port", str(control)), tmp_path / "superlink.log",
            env={**env, "FLWR_HOME": str(tmp_path / "home-link")}, cwd=tmp_path))
        processes.wait_until(lambda: processes.port_open("127.0.0.1", control), 180, "SuperLink",
                             process=procs[-1], name="the SuperLink",
                             log=tmp_path / "superlink.log")
        procs.append(processes.start(_fedmaml(
            "deploy", "supernode", "--superlink", f"127.0.0.1:{fleet}", "--insecure",
            "--partition-id", "0", "--trusted-entities", str(tmp_path / "trusted.yaml"), "--port",
            str(processes.free_port()), "--home", str(tmp_path / "home-node")),
            tmp_path / "node.log", env=env, cwd=tmp_path))
        processes.wait_until(lambda: "SuperNode ID" in (tmp_path / "node.log").read_text(
            errors="replace"), 120, "the node to join", process=procs[-1], name="the SuperNode",
            log=tmp_path / "node.log")
        home = tmp_path / "home-op"
        write_connection("op", f"127.0.0.1:{control}", None, insecure=True, home=home,
                         token_file=tmp_path / "home-link" / "operator.token")
        (tmp_path / "exp.yaml").write_text(CONFIG.format(out=tmp_path / "runs"))
        assert main(["deploy", "run-config", str(tmp_path / "exp.yaml"), "-o",
                     str(tmp_path / "run.toml")]) == 0
        from fedmaml.deploy.runs import submit

        with staged_app() as app:
            submit(app, "op", tmp_path / "run.toml", home=home)
        # Its first message (the ServerApp asking which client the node serves) is refused, and so
        # is every later one: the app's code never runs on the node.
        processes.wait_until(lambda: "FAB could not be verified" in (
            tmp_path / "node.log").read_text(errors="replace"), 120, "the node to refuse the app",
            process=procs[-1], name="the SuperNode", log=tmp_path / "node.log")
        log = (tmp_path / "node.log").read_text(errors="replace")
        assert "fedmaml: ClientApp task" not in log  # no ClientApp process was started
    finally:
        for proc in reversed(procs):
            processes.stop(proc)


# -- the operator token: other processes on the SuperLink's own machine ----------------------------

def test_operator_token_file_is_private_and_checked(tmp_path, capsys):
    from fedmaml.deploy.operator_token import authorized, ensure_token, read_token

    path = tmp_path / "link" / "operator.token"
    token = ensure_token(path)
    assert (path.stat().st_mode & 0o777) == 0o600 and len(token) >= 40
    assert ensure_token(path) == token == read_token(path)  # made once, then read
    assert authorized(f"Bearer {token}".encode(), token)
    for header in (None, b"", b"Bearer", f"Bearer {token}x".encode(), f"Basic {token}".encode(),
                   f"Bearer {ensure_token(tmp_path / 'other.token')}".encode()):
        assert not authorized(header, token), header
    path.chmod(0o640)  # a token others can read is refused, as ssh refuses such a key
    with pytest.raises(DeployError, match=r"mode 0640: others can read it; allowed: readable by "
                                          r"its owner only \(chmod 600 .*operator.token\)"):
        read_token(path)
    (tmp_path / "empty.token").write_text("\n")
    (tmp_path / "empty.token").chmod(0o600)
    with pytest.raises(DeployError, match="empty.token holds no token"):
        read_token(tmp_path / "empty.token")
    with pytest.raises(DeployError, match="missing.token not found"):
        read_token(tmp_path / "missing.token")
    # The SuperLink's command line always carries it: next to the certificates by default.
    c = make_certificates(tmp_path / "certs")
    assert main(["deploy", "superlink", "--certs", str(c.directory), "--dry-run"]) == 0
    assert f"--operator-token-file {c.directory / 'operator.token'}" in capsys.readouterr().out
    assert not (c.directory / "operator.token").exists()  # a dry run creates nothing


needs_local_ports = pytest.mark.skipif(os.environ.get("FEDMAML_SKIP_DEPLOYMENT") == "1",
                                       reason="FEDMAML_SKIP_DEPLOYMENT=1")


@needs_local_ports
@pytest.mark.deployment
@pytest.mark.slow
def test_a_local_process_without_the_operator_token_is_refused(tmp_path, capsys):
    """Any process on the SuperLink's machine reaches the control socket (127.0.0.1): without the
    operator token it can neither list runs, nor submit one, nor register a node key -- raw HTTP
    requests and the flwr CLI alike; the operator's flwr commands work unchanged."""
    import ssl

    import httpx

    env = {**program_env(), "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1"}
    procs = []
    try:
        assert main(["deploy", "certs", str(tmp_path / "certs")]) == 0
        assert main(["deploy", "keys", str(tmp_path / "keys"), "device", "other"]) == 0
        ca, keys = tmp_path / "certs" / "ca.crt", tmp_path / "keys"
        fleet, control = processes.free_port(), processes.free_port()
        procs.append(processes.start(
            _fedmaml("deploy", "superlink", "--certs", str(tmp_path / "certs"), "--host",
                     "127.0.0.1", "--port", str(fleet), "--control-port", str(control)),
            tmp_path / "superlink.log", env={**env, "FLWR_HOME": str(tmp_path / "home-link")},
            cwd=tmp_path))
        processes.wait_until(lambda: processes.port_open("127.0.0.1", control), 120, "SuperLink",
                             process=procs[-1], name="the SuperLink",
                             log=tmp_path / "superlink.log")
        token = (tmp_path / "certs" / "operator.token").read_text().strip()

        # Raw requests, as `curl` would send them: refused before Flower sees them.
        base = f"https://127.0.0.1:{control}/v1/control/"
        statuses = {}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60) as client:
            for method in ("list-runs", "start-run", "register-node"):
                for name, headers in (("none", {}), ("wrong", {"Authorization": "Bearer nope"})):
                    answer = client.post(base + method, content=b"",
                                         headers={"content-type": "application/protobuf",
                                                  **headers})
                    statuses[f"{method}, {name}"] = answer.status_code
                    assert "operator token" in answer.text, (method, answer.text)
            # The same request with the token reaches Flower (whatever Flower then answers).
            statuses["list-runs, token"] = client.post(
                base + "list-runs", content=b"", headers={"content-type": "application/protobuf",
                                                          "Authorization": f"Bearer {token}"}
            ).status_code
        assert {k: v for k, v in statuses.items() if k.endswith(("none", "wrong"))} == {
            k: 401 for k in statuses if k.endswith(("none", "wrong"))}, statuses
        assert statuses["list-runs, token"] != 401, statuses

        # The flwr CLI of a local user who does not hold the token: the connection is there
        # (address and CA are public), the credential is not.
        stranger = tmp_path / "home-stranger"
        write_connection("link", f"127.0.0.1:{control}", ca, default=True, home=stranger)
        refused = {}
        for what, args in (("list", ["ls", "link"]),
                           ("register", ["supernode", "register", str(keys / "other.pub"), "link"])):
            with pytest.raises(DeployError, match="Authentication failed") as e:
                flwr(args, home=stranger)
            refused[what] = str(e.value)
        (tmp_path / "exp.yaml").write_text(CONFIG.format(out=tmp_path / "runs"))
        assert main(["deploy", "run-config", str(tmp_path / "exp.yaml"), "-o",
                     str(tmp_path / "run.toml")]) == 0
        from fedmaml.deploy.runs import submit

        with staged_app() as app, pytest.raises(DeployError, match="Authentication failed"):
            submit(app, "link", tmp_path / "run.toml", home=stranger)

        # The operator: `fedmaml deploy connection` stores the token found next to the CA, and
        # flwr's own commands work: register a key, list nodes and runs, submit, stop.
        home = tmp_path / "home-op"
        assert main(["deploy", "connection", "op", "--address", f"127.0.0.1:{control}", "--ca",
                     str(ca), "--default", "--home", str(home)]) == 0
        assert "stored the operator token" in capsys.readouterr().out
        assert ((home / "credentials.yaml").stat().st_mode & 0o777) == 0o600
        node_id = int(flwr(["supernode", "register", str(keys / "device.pub"), "op"],
                           home=home)["node-id"])
        assert [int(n["node-id"]) for n in flwr(["supernode", "ls", "op"], home=home)["nodes"]
                ] == [node_id]  # the stranger's key was not registered
        assert flwr(["ls", "op"], home=home).get("runs", []) == []  # nor was its run submitted
        with staged_app() as app:
            run_id = submit(app, "op", tmp_path / "run.toml", home=home)
        assert [int(r["run-id"]) for r in flwr(["ls", "op"], home=home)["runs"]] == [run_id]
        flwr(["stop", str(run_id), "op"], home=home)
        log = (tmp_path / "superlink.log").read_text(errors="replace")
        assert log.count('/v1/control/list-runs HTTP/1.1" 401') >= 3  # raw twice, flwr once
        assert 'POST /v1/control/start-run HTTP/1.1" 200' in log
    finally:
        for proc in reversed(procs):
            processes.stop(proc)
    for proc in procs:
        assert proc.poll() is not None
