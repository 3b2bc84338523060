"""Run a Flower App on a real deployment on this machine: one SuperLink, N SuperNodes, loopback.

Why: simulation and in-process runs skip what a multi-machine deployment depends on — TLS, SuperNode
authentication, one OS process per component, the app shipped as a FAB and a fresh ClientApp
process per message. `LocalDeployment` starts the same executables with the same flags as
docs/DEPLOYMENT.md, all bound to 127.0.0.1, submits runs with `flwr run`, waits for them and tears
every process group down, also on failure.

    with LocalDeployment("deploy/flexmoe-app", num_supernodes=2, node_configs=nodes) as deployment:
        completed = deployment.run({"config": "cfg.json", "method": "flex", "run-dir": "/tmp/run"})

Each component gets its own FLWR_HOME (as on separate machines); logs and keys stay in `work_dir`,
which is kept when anything fails so the logs can be read.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flexmoe.runtime import console

LOOPBACK = "127.0.0.1"
CONNECTION_NAME = "local-deployment"
"""Name of the SuperLink connection written to the CLI's `$FLWR_HOME/config.toml`."""

ConfigValue = str | int | float | bool
STATUS_CHECK_INTERVAL = 15.0
"""Seconds between `flwr ls` checks while a log stream is open (a CLI call costs ~1 s CPU)."""

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""No telemetry, no update check, and no `uv sync` of the app's dependencies per run (offline)."""


class DeploymentError(RuntimeError):
    """The local deployment could not start, run or finish; the message carries the logs."""


# --- TLS certificates and SuperNode keys ------------------------------------------------------


@dataclass(frozen=True)
class TlsCertificates:
    """A self-signed CA and a server certificate/key signed by it (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SupernodeKeyPair:
    """A SuperNode's authentication keys in OpenSSH format, as flwr 1.41 reads them.

    `flower-supernode --auth-supernode-private-key` loads the private key, `flwr supernode
    register` the public key; both must be EC keys on a NIST curve (same as `ssh-keygen -t ecdsa`).
    """

    private_key: Path
    public_key: Path


def write_tls_certificates(
    out_dir: str | Path,
    hosts: Iterable[str] = (LOOPBACK, "localhost"),
    valid_days: int = 30,
) -> TlsCertificates:
    """Write `ca.pem`, `server.pem` and `server.key` for a SuperLink reachable as `hosts`.

    `hosts` become the server certificate's subject alternative names (IP addresses or DNS names);
    clients verify the SuperLink against `ca.pem`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flexmoe deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower-superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsCertificates(out / "ca.pem", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


def write_supernode_key_pair(out_dir: str | Path, name: str) -> SupernodeKeyPair:
    """Write `<name>` (private) and `<name>.pub` (public), an EC P-384 pair in OpenSSH format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = SupernodeKeyPair(out / name, out / f"{name}.pub")
    _write_private(
        pair.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pair.public_key.write_bytes(public + f" {name}\n".encode())
    return pair


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise DeploymentError("write_tls_certificates needs at least one host name or IP")
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by the owner only."""
    path.write_bytes(data)
    path.chmod(0o600)


# --- small helpers ------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def toml_table(values: Mapping[str, ConfigValue]) -> str:
    """A flat TOML table, the form `flwr` accepts for `--run-config` and `--node-config` files."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            if value != value or value in (float("inf"), float("-inf")):
                raise DeploymentError(f"config value {key}={value} is not a finite number")
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)  # JSON string escapes are valid TOML basic strings
        else:
            raise DeploymentError(
                f"config value {key}={value!r} has type {type(value).__name__}; "
                "Flower configs hold only str, int, float and bool"
            )
        bare = re.fullmatch(r"[A-Za-z0-9_-]+", key)
        lines.append(f"{key if bare else json.dumps(key)} = {text}\n")
    return "".join(lines)


def app_config_keys(app_dir: Path) -> set[str]:
    """The run-config keys a Flower App declares in `[tool.flwr.app.config]` (dotted if nested)."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise DeploymentError(f"{app_dir} is not a Flower App: it has no pyproject.toml")
    with pyproject.open("rb") as f:
        config = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})

    def flatten(table: Mapping[str, Any], prefix: str) -> Iterable[str]:
        for key, value in table.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return set(flatten(config, ""))


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"--- {path.name}: (no log)\n"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {path}\n" + "\n".join(text) + "\n"


def _executable(name: str) -> str:
    """A Flower executable from this Python environment (preferred) or from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"`{name}` not found: install flwr 1.41 in this Python environment")
    return found


# --- the deployment -----------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A started component: its own process group, its log file, and its argv (for error reports).

    A component that `must_stay_up` makes any wait fail as soon as it exits.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str]
    must_stay_up: bool = True


@dataclass(frozen=True)
class CompletedRun:
    """A run that reached `finished:completed`, with its ServerApp log and `flwr ls` record."""

    run_id: int
    status: str
    elapsed_seconds: float
    log: str
    record: dict[str, Any] = field(repr=False)


class LocalDeployment:
    """A SuperLink and `num_supernodes` SuperNodes as separate processes on 127.0.0.1.

    `node_configs[i]` is merged over the default `{"partition-id": i, "num-partitions": N}` of
    SuperNode i (put data and personal-state directories there). With `tls`, a fresh CA and server
    certificate secure every connection; with `auth`, every SuperNode gets a key pair that is
    registered with `flwr supernode register` before the node starts, and the SuperLink refuses
    all other nodes. `env` adds environment variables to every component (e.g. FLEXMOE_THREADS).
    """

    def __init__(
        self,
        app_dir: str | Path,
        num_supernodes: int = 2,
        node_configs: list[Mapping[str, ConfigValue]] | None = None,
        *,
        tls: bool = True,
        auth: bool = True,
        work_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.app_keys = app_config_keys(self.app_dir)
        if num_supernodes < 1:
            raise DeploymentError(f"num_supernodes must be >= 1, got {num_supernodes}")
        node_configs = node_configs or [{} for _ in range(num_supernodes)]
        if len(node_configs) != num_supernodes:
            raise DeploymentError(
                f"got {len(node_configs)} node_configs for {num_supernodes} SuperNodes: "
                "pass one mapping per SuperNode"
            )
        self.node_configs = [
            {"partition-id": i, "num-partitions": num_supernodes, **config}
            for i, config in enumerate(node_configs)
        ]
        self.tls = tls
        self.auth = auth
        self.startup_timeout = startup_timeout
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="flexmoe-deploy-")).resolve()
        self.extra_env = dict(env or {})
        self.processes: list[ManagedProcess] = []
        self.superlink_port = 0
        self.certificates: TlsCertificates | None = None
        self._cli_home = self.work_dir / "cli" / "flwr-home"

    # -- lifecycle --

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None and self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif exc_type is not None:
            console.print(f"local deployment logs and keys kept in {self.work_dir}")

    def start(self) -> None:
        """Start the SuperLink, connect the CLI to it, then start (and register) the SuperNodes."""
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certificates = write_tls_certificates(self.work_dir / "certs")
        # All ports at once: ports probed one by one could repeat before their owners bind them.
        self.superlink_port, *supernode_ports = free_ports(1 + len(self.node_configs))
        self._start_superlink()
        self._write_cli_connection()
        for config, port in zip(self.node_configs, supernode_ports, strict=True):
            self.start_supernode(config, port=port)
        self.wait_for_online_nodes(len(self.node_configs))

    def stop(self) -> None:
        """Terminate every component's process group (SuperNodes first), killing stragglers."""
        for process in reversed(self.processes):
            _terminate_group(process.popen)
        self.processes.clear()

    # -- components --

    def _start_superlink(self) -> None:
        home = self.work_dir / "superlink"
        argv = [
            _executable("flower-superlink"),
            "--host",
            LOOPBACK,
            "--port",
            str(self.superlink_port),
            "--database",
            str(home / "state.db"),
            "--disable-runtime-dependency-installation",
            *self._server_tls_args(),
        ]
        if self.auth:
            argv.append("--enable-supernode-auth")
        process = self._launch("superlink", argv, home)
        deadline = time.monotonic() + self.startup_timeout
        while not _port_open(self.superlink_port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"SuperLink did not open port {self.superlink_port} within "
                    f"{self.startup_timeout:.0f} s\n{_tail(process.log)}"
                )
            time.sleep(0.2)

    def start_supernode(
        self,
        node_config: Mapping[str, ConfigValue],
        *,
        register: bool = True,
        port: int | None = None,
    ) -> ManagedProcess:
        """Start one more SuperNode (with `auth`, `register=False` starts one that gets refused).

        A SuperNode started with `register=False` may exit without failing the deployment.
        `port` is its local Runtime API port (a free one if not given).
        """
        index = sum(p.name.startswith("supernode-") for p in self.processes)
        name = f"supernode-{index}"
        home = self.work_dir / name
        home.mkdir(parents=True, exist_ok=True)
        # flwr also reads --node-config from a TOML file: paths with spaces or quotes stay intact.
        config_file = home / "node-config.toml"
        config_file.write_text(toml_table(node_config), encoding="utf-8")
        argv = [
            _executable("flower-supernode"),
            "--superlink",
            f"{LOOPBACK}:{self.superlink_port}",
            "--host",
            LOOPBACK,
            "--port",
            str(port or free_ports(1)[0]),
            "--node-config",
            str(config_file),
            *self._client_tls_args(),
        ]
        if self.auth:
            keys = write_supernode_key_pair(home / "keys", name)
            if register:
                self.flwr("supernode", "register", str(keys.public_key), CONNECTION_NAME)
            argv += ["--auth-supernode-private-key", str(keys.private_key)]
        return self._launch(name, argv, home, must_stay_up=register)

    def _launch(
        self, name: str, argv: list[str], home: Path, must_stay_up: bool = True
    ) -> ManagedProcess:
        home.mkdir(parents=True, exist_ok=True)
        log = self.work_dir / "logs" / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=home,
                env=self._env(home / "flwr-home"),
                start_new_session=True,  # own process group: teardown reaches its children too
            )
        process = ManagedProcess(name, popen, log, argv, must_stay_up)
        self.processes.append(process)
        return process

    def _server_tls_args(self) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certificates.ca_cert),
            "--ssl-certfile",
            str(self.certificates.server_cert),
            "--ssl-keyfile",
            str(self.certificates.server_key),
        ]

    def _client_tls_args(self) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        return ["--root-certificates", str(self.certificates.ca_cert)]

    def _env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **OFFLINE_ENV, **self.extra_env, "FLWR_HOME": str(flwr_home)}
        # The SuperLink and SuperNodes start flwr-serverapp / flwr-clientapp from PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _write_cli_connection(self) -> None:
        """Point the `flwr` CLI at the SuperLink: a connection in its `$FLWR_HOME/config.toml`."""
        connection: dict[str, ConfigValue] = {"address": f"{LOOPBACK}:{self.superlink_port}"}
        if self.certificates is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.certificates.ca_cert)
        self._cli_home.mkdir(parents=True, exist_ok=True)
        (self._cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n{toml_table(connection)}",
            encoding="utf-8",
        )

    # -- talking to the SuperLink --

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run `flwr <args> --format json` against this deployment and return its JSON answer."""
        argv = [_executable("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self._env(self._cli_home),
                cwd=self.work_dir,
            )
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s\n"
                f"{self._log_tails()}"
            ) from err
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {"success": False}
        if done.returncode != 0 or not answer.get("success"):
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (exit code {done.returncode}): "
                f"{answer.get('error-message', '')}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
                f"\n{self._log_tails()}"
            )
        return answer

    def node_statuses(self) -> list[str]:
        """The status of every SuperNode the SuperLink knows ("registered", "online", ...)."""
        return [node["status"] for node in self.flwr("supernode", "ls", CONNECTION_NAME)["nodes"]]

    def wait_for_online_nodes(self, count: int) -> None:
        """Block until `count` SuperNodes are online (they connected, and passed auth if on)."""
        deadline = time.monotonic() + self.startup_timeout
        while (online := self.node_statuses().count("online")) < count:
            self._check_alive()
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"only {online} of {count} SuperNodes came online within "
                    f"{self.startup_timeout:.0f} s\n{self._log_tails()}"
                )
            time.sleep(1.0)

    def run(self, run_config: Mapping[str, ConfigValue], timeout: float = 600.0) -> CompletedRun:
        """Submit the app with `flwr run`, wait until it finishes, and return the completed run.

        Raises DeploymentError (with the ServerApp and component logs) when the run fails, a
        component dies, or the run is not finished after `timeout` seconds (it is then stopped).
        """
        unknown = sorted(set(run_config) - self.app_keys)
        if unknown:
            raise DeploymentError(
                f"run config keys {unknown} are not declared in [tool.flwr.app.config] of "
                f"{self.app_dir / 'pyproject.toml'} (declared: {sorted(self.app_keys)})"
            )
        if not self.processes:
            raise DeploymentError(
                "the deployment is not running: use `with LocalDeployment(...) as deployment:`"
            )
        runs_dir = self.work_dir / "runs"
        runs_dir.mkdir(exist_ok=True)
        config_file = runs_dir / f"run-config-{time.time_ns()}.toml"
        config_file.write_text(toml_table(run_config), encoding="utf-8")
        started = self.flwr(
            "run", str(self.app_dir), CONNECTION_NAME, "--run-config", str(config_file)
        )
        run_id = int(started["run-id"])
        log_path = runs_dir / f"run-{run_id}.log"
        deadline = time.monotonic() + timeout

        # `flwr log --stream` returns once the run has finished: one process instead of polling.
        with log_path.open("wb") as out:
            stream = subprocess.Popen(
                [_executable("flwr"), "log", str(run_id), CONNECTION_NAME, "--stream"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(self._cli_home),
                start_new_session=True,
            )
            try:
                record = self._wait_until_finished(run_id, stream, deadline, log_path)
            finally:
                _terminate_group(stream)

        log = log_path.read_text(encoding="utf-8", errors="replace")
        if record["status"] != "finished:completed":
            raise DeploymentError(
                f"run {run_id} ended as {record['status']} ({record['status-details']})\n"
                f"--- ServerApp log\n{log}\n{self._log_tails()}"
            )
        return CompletedRun(run_id, record["status"], float(record["elapsed"]), log, record)

    def _wait_until_finished(
        self, run_id: int, stream: subprocess.Popen[bytes], deadline: float, log_path: Path
    ) -> dict[str, Any]:
        """Wait for the log stream to end; ask `flwr ls` too, in case the stream hangs or drops."""
        next_status_check = time.monotonic() + STATUS_CHECK_INTERVAL
        while True:
            stream_ended = stream.poll() is not None
            now = time.monotonic()
            if stream_ended or now >= next_status_check or now > deadline:
                record = self.flwr("ls", CONNECTION_NAME, "--run-id", str(run_id))["runs"][0]
                if record["status"].startswith("finished"):
                    return record
                if now > deadline:
                    self.flwr("stop", str(run_id), CONNECTION_NAME)
                    raise DeploymentError(
                        f"run {run_id} still {record['status']} at the timeout; stopped it\n"
                        f"{_tail(log_path)}{self._log_tails()}"
                    )
                next_status_check = now + (2.0 if stream_ended else STATUS_CHECK_INTERVAL)
            self._check_alive()
            time.sleep(0.5)

    def _check_alive(self) -> None:
        for process in self.processes:
            code = process.popen.poll()
            if code is not None and process.must_stay_up:
                raise DeploymentError(
                    f"{process.name} exited with code {code}\ncommand: {' '.join(process.argv)}\n"
                    f"{_tail(process.log)}"
                )

    def _log_tails(self) -> str:
        return "".join(_tail(process.log) for process in self.processes)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _terminate_group(popen: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, wait `grace` seconds, then SIGKILL it; reap the leader."""
    if popen.poll() is None:
        _signal_group(popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=grace)
    _signal_group(popen.pid, signal.SIGKILL)  # children the leader left behind
    popen.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
