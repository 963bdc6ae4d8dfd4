"""The Flower command lines of a deployment, built from a few named settings.

``flower-superlink`` and ``flower-supernode`` take a dozen flags each in the secure setup (TLS files,
node authentication, offline app loading, node config); :func:`superlink_argv` and
:func:`supernode_argv` spell them out once, so the guide, the helpers and the end-to-end test use the
same lines. Programs are looked up next to the running Python first (the virtual environment's
``bin``), then on ``PATH``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmaml.deploy.crypto import Certificates, DeployError

#: The SuperLink's fleet socket (SuperNodes connect here) and its control socket (``flwr`` and the
#: ServerApp processes; on this machine only, by default). See fedmaml/deploy/superlink_server.py.
DEFAULT_FLEET_PORT = 9092
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_CONTROL_HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
DEFAULT_SUPERNODE_PORT = 9094
CONTROL_WARNING = ("WARNING: the Control API listens on {host}: whoever reaches {host}:{port} and "
                   "holds the operator token can submit runs, which every device executes, and "
                   "register node keys; the token crosses the network in clear unless TLS is on. "
                   "Keep it to the operator: 127.0.0.1 plus an SSH tunnel (docs/deployment.md).")
INSECURE_WARNING = ("WARNING: insecure mode: traffic is not encrypted and the SuperLink accepts any "
                    "SuperNode. Use it only on a machine or network you fully trust, for tests.")


def program(name: str) -> str:
    """The path of a Flower program (``flower-superlink``, ``flwr``...)."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file():
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"program {name!r} not found next to {sys.executable} nor on PATH; "
                          "install flwr (pip install 'flwr[simulation]>=1.41,<1.42')")
    return found


def program_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the Flower programs' directory first on PATH: a
    SuperLink or SuperNode starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
    name, which fails when the virtual environment is not activated."""
    out = dict(os.environ if env is None else env)
    bin_dir = str(Path(program("flwr")).parent)
    path = out.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        out["PATH"] = bin_dir + (os.pathsep + path if path else "")
    out.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    out.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return out


def show(argv: Sequence[str]) -> str:
    """A command line as one would type it."""
    return " ".join(shlex.quote(a) for a in argv)


def superlink_argv(certs: str | Path | None, *, host: str = "0.0.0.0",
                   port: int = DEFAULT_FLEET_PORT, control_host: str = DEFAULT_CONTROL_HOST,
                   control_port: int = DEFAULT_SUPERLINK_PORT, database: str | Path | None = None,
                   insecure: bool = False, operator_token: str | Path | None = None) -> list[str]:
    """A SuperLink with TLS (``certs``: a directory made by
    :func:`~fedmaml.deploy.crypto.make_certificates`), node authentication, and apps loaded from
    the submitted bundle without installing anything (runtime dependency installation needs the
    internet, and would change the environment). ``insecure``: neither TLS nor node
    authentication.

    SuperNodes connect to ``host:port`` (the fleet socket, which answers the Fleet API only);
    ``flwr`` and the ServerApp processes to ``control_host:control_port`` (every API; this machine
    only by default). Flower 1.41 serves all its APIs on one socket, so the SuperLink runs under
    :mod:`fedmaml.deploy.superlink_server`, which splits them. ``operator_token``: the file of the
    token the control socket requires (fedmaml/deploy/operator_token.py); ``None``: no credential
    (only for callers that add their own)."""
    if (host, port) == (control_host, control_port):
        raise DeployError(f"--host/--port {host}:{port} is also the control address: the fleet "
                          "socket (SuperNodes) and the control socket (flwr) must differ")
    argv = [sys.executable, "-m", "fedmaml.deploy.superlink_server", "--fleet-host", host,
            "--fleet-port", str(port)]
    if operator_token is not None:
        argv += ["--operator-token-file", str(Path(operator_token).expanduser().resolve())]
    if insecure:
        if certs is not None:
            raise DeployError("give either --certs (TLS, the default) or --insecure, not both")
        argv.append("--insecure")
    else:
        if certs is None:
            raise DeployError("--certs DIR is required (create it with `fedmaml deploy certs DIR "
                              "--host <address of this machine>`), or pass --insecure for a test")
        c = Certificates(Path(certs).expanduser().resolve()).check()
        argv += ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.cert),
                 "--ssl-keyfile", str(c.key), "--enable-supernode-auth"]
    argv += ["--disable-runtime-dependency-installation", "--host", control_host,
             "--port", str(control_port)]
    if database is not None:  # registered node keys and runs survive a SuperLink restart
        argv += ["--database", str(Path(database).expanduser().resolve())]
    return argv


@dataclass(frozen=True)
class NodeSettings:
    """What a device's SuperNode is told: who it is and where its memory and data live."""

    partition_id: int
    num_partitions: int | None = None
    memory_dir: str | Path | None = None
    data_path: str | Path | None = None
    memory_reset: bool = False

    def node_config(self) -> str:
        """The ``--node-config`` string (TOML values; paths made absolute)."""
        if self.partition_id < 0:
            raise DeployError(f"--partition-id {self.partition_id}: expected an integer >= 0")
        items: list[tuple[str, object]] = [("partition-id", self.partition_id)]
        if self.num_partitions is not None:
            if self.num_partitions <= self.partition_id:
                raise DeployError(f"--num-partitions {self.num_partitions} must exceed "
                                  f"--partition-id {self.partition_id}")
            items.append(("num-partitions", self.num_partitions))
        if self.memory_dir is not None:
            items.append(("memory-dir", str(Path(self.memory_dir).expanduser().resolve())))
        if self.data_path is not None:
            path = Path(self.data_path).expanduser().resolve()
            if not path.exists():
                raise DeployError(f"--data-path {path}: not found on this device")
            items.append(("data-path", str(path)))
        if self.memory_reset:
            items.append(("memory-reset", True))
        return " ".join(f"{k}={_value(v)}" for k, v in items)


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if '"' in s or "\\" in s:
        if "'" in s:
            raise DeployError(f"path {s!r}: quotes of both kinds cannot be passed in a node config")
        return f"'{s}'"
    return f'"{s}"'


def supernode_argv(superlink: str, node: NodeSettings, *, ca: str | Path | None = None,
                   key: str | Path | None = None, port: int = DEFAULT_SUPERNODE_PORT,
                   insecure: bool = False, max_retries: int | None = None, warm: bool = True,
                   trusted_entities: str | Path | None = None) -> list[str]:
    """A SuperNode that trusts ``ca`` and authenticates with ``key`` (or neither, ``insecure``).

    ``port``: its local Runtime API, where its ClientApp processes connect; distinct per node when
    several share a machine. ``max_retries``: give up after that many failed connection attempts
    (default: retry for ever, which a device that boots before the server wants). ``warm``: the
    node's ClientApp processes are forked by :func:`warm_clientapps_argv`'s process, started next to
    it (``--isolation process``); otherwise Flower starts each one from scratch.
    ``trusted_entities``: Flower's list of public keys whose signed apps the node runs (it then
    refuses every other app)."""
    if ":" not in superlink or "://" in superlink:
        raise DeployError(f"--superlink {superlink!r}: expected HOST:PORT of the "
                          "Fleet API, e.g. 192.168.1.10:9092")
    argv = [program("flower-supernode"), "--superlink", superlink]
    if insecure:
        if ca is not None or key is not None:
            raise DeployError("--insecure takes neither --ca nor --key")
        argv.append("--insecure")
    else:
        if ca is None or key is None:
            raise DeployError("--ca CA_CERT and --key NODE_KEY are required (from `fedmaml deploy "
                              "certs` and `fedmaml deploy keys`), or pass --insecure for a test")
        for flag, path in (("--ca", ca), ("--key", key)):
            if not Path(path).expanduser().is_file():
                raise DeployError(f"{flag} {path}: file not found")
        argv += ["--root-certificates", str(Path(ca).expanduser().resolve()),
                 "--auth-supernode-private-key", str(Path(key).expanduser().resolve())]
    argv += ["--node-config", node.node_config(), "--port", str(port)]
    if warm:
        argv += ["--isolation", "process"]
    if trusted_entities is not None:
        path = Path(trusted_entities).expanduser().resolve()
        if not path.is_file():
            raise DeployError(f"--trusted-entities {path}: file not found")
        argv += ["--trusted-entities", str(path)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def warm_clientapps_argv(port: int, supernode_pid: int) -> list[str]:
    """The process that forks a SuperNode's ClientApp processes (fedmaml/deploy/warm_clientapps.py),
    for a node whose Runtime API is on ``127.0.0.1:port``; it exits with the node."""
    return [sys.executable, "-m", "fedmaml.deploy.warm_clientapps", "--runtime-api-address",
            f"127.0.0.1:{port}", "--insecure", "--parent-pid", str(supernode_pid)]


def prepare_memory_dir(node: NodeSettings) -> None:
    """Create the memory directory now and check it is writable: better a clear error at start
    than a failed ClientApp in the middle of a run."""
    if node.memory_dir is None:
        return
    path = Path(node.memory_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a unique name: nodes may share the directory
            pass
    except OSError as e:
        raise DeployError(f"--memory-dir {path}: not writable ({e.strerror})") from None
