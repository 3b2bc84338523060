"""Real Flower deployment on loopback: TLS, SuperNode authentication, one process per component.

The stand-in app in tests/deploy_app (FedAvg of a numpy linear model) must give bitwise the same
final arrays deployed on a SuperLink + 2 SuperNodes as the same ServerApp/ClientApp run in-process
on `EmbeddedGrid`.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from flexmoe.federated.deployment import (
    DeploymentError,
    LocalDeployment,
    toml_table,
    write_supernode_key_pair,
    write_tls_certificates,
)
from flexmoe.federated.grid import run_embedded

APP_DIR = Path(__file__).parent / "deploy_app"
RUN_CONFIG = {"num-server-rounds": 2, "local-steps": 5, "learning-rate": 0.1, "seed": 7}


def run_in_process(out_dir: Path, node_configs: list[dict], monkeypatch) -> dict[str, np.ndarray]:
    """The same ServerApp and ClientApp objects on flexmoe's in-process grid (no network)."""
    monkeypatch.syspath_prepend(str(APP_DIR))
    from toyfed.client_app import app as client_app
    from toyfed.server_app import app as server_app

    with (APP_DIR / "pyproject.toml").open("rb") as f:
        defaults = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    run_config = {**defaults, **RUN_CONFIG, "out-dir": str(out_dir)}
    run_embedded(server_app, client_app, len(node_configs), run_config, node_configs)
    return dict(np.load(out_dir / "final_arrays.npz"))


@pytest.mark.slow
def test_tls_auth_deployment_matches_in_process(tmp_path, monkeypatch):
    node_configs = [
        {"data-dir": str(tmp_path / f"data-{i}"), "state-dir": str(tmp_path / f"state-{i}")}
        for i in range(2)
    ]
    with LocalDeployment(
        APP_DIR, num_supernodes=2, node_configs=node_configs, tls=True, auth=True
    ) as deployment:
        assert deployment.certificates is not None
        completed = deployment.run({**RUN_CONFIG, "out-dir": str(tmp_path / "out")})
        work_dir = deployment.work_dir

    assert completed.status == "finished:completed"
    assert "[ROUND 2/2]" in completed.log
    assert "Received 2 results and 0 failures" in completed.log
    deployed = dict(np.load(tmp_path / "out" / "final_arrays.npz"))
    expected = run_in_process(tmp_path / "in-process", node_configs, monkeypatch)
    assert deployed.keys() == expected.keys()
    for key in expected:
        assert deployed[key].dtype == np.float32
        np.testing.assert_array_equal(deployed[key], expected[key])
    assert not work_dir.exists(), "a clean exit removes the temporary work dir"


@pytest.mark.slow
def test_unregistered_supernode_is_refused_and_failed_runs_raise(tmp_path):
    """One SuperNode (to save start-up time) serves both checks."""
    with LocalDeployment(APP_DIR, num_supernodes=1, work_dir=tmp_path, startup_timeout=60) as dep:
        intruder = dep.start_supernode({"partition-id": 1, "num-partitions": 2}, register=False)
        deadline = time.monotonic() + 30
        while intruder.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert intruder.popen.poll() not in (None, 0), "the SuperLink must refuse the node"
        assert "Failed to activate SuperNode" in intruder.log.read_text()
        assert dep.node_statuses() == ["online"]

        not_a_dir = tmp_path / "a-file"
        not_a_dir.write_text("")
        failing = {"num-nodes": 1, "num-server-rounds": 0, "out-dir": str(not_a_dir / "out")}
        with pytest.raises(DeploymentError, match="finished:failed") as error:
            dep.run(failing)
        assert "NotADirectoryError" in str(error.value), "the ServerApp traceback is reported"
        popens = [process.popen for process in dep.processes]
    assert all(popen.poll() is not None for popen in popens), "teardown ends every component"


def test_certificates_and_keys_have_the_formats_flower_reads(tmp_path):
    certs = write_tls_certificates(tmp_path, hosts=["127.0.0.1", "superlink.example"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example"]
    load_pem_private_key(certs.server_key.read_bytes(), password=None)
    assert certs.server_key.stat().st_mode & 0o077 == 0

    keys = write_supernode_key_pair(tmp_path, "node-a")
    private = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()


def test_toml_table_round_trips_and_rejects_bad_values():
    values = {"a-b": 1, "path": 'C:\\dir "x"', "flag": True, "lr": 1e-4, "dotted.key": "v"}
    assert tomllib.loads(toml_table(values)) == values
    with pytest.raises(DeploymentError, match="list"):
        toml_table({"bad": [1, 2]})  # type: ignore[dict-item]


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    deployment = LocalDeployment(APP_DIR, work_dir=tmp_path)  # constructed, not started
    with pytest.raises(DeploymentError, match=r"not declared.*out-dir"):
        deployment.run({"no-such-key": 1})
    with pytest.raises(DeploymentError, match="not running"):
        deployment.run({"seed": 1})
    with pytest.raises(DeploymentError, match=r"no pyproject\.toml"):
        LocalDeployment(tmp_path)
    with pytest.raises(DeploymentError, match="one mapping per SuperNode"):
        LocalDeployment(APP_DIR, num_supernodes=2, node_configs=[{}])
