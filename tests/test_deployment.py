"""The flexmoe Flower App on a real deployment on loopback: TLS, SuperNode auth, one process each.

A FLEx run on a SuperLink + 2 SuperNodes — each SuperNode reading its own exported data-dir and
keeping personal state in its own state-dir — must give *bitwise* the same aggregated shared
arrays, personal states and test predictions as the same config run embedded (`run_methods`).
Bitwise, not to a tolerance: both runtimes execute the same code with the same seeds and the same
torch thread count, and the server sorts replies by partition before averaging in fp32, so the
only difference — process boundaries and the network — must not change a single bit.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from federated_support import tiny_config, write_small_dolly
from safetensors.torch import load_file

from flexmoe.federated import task
from flexmoe.federated.config import RunConfig
from flexmoe.federated.deployment import (
    DeploymentError,
    LocalDeployment,
    app_config_keys,
    toml_table,
    write_supernode_key_pair,
    write_tls_certificates,
)
from flexmoe.federated.export_data import ExportError, client_dir_name, export_client_data
from flexmoe.federated.export_data import main as export_main
from flexmoe.federated.messages import load_run_config
from flexmoe.federated.run import run_methods

APP_DIR = Path(__file__).resolve().parents[1] / "deploy" / "flexmoe-app"
CATEGORIES = ("closed_qa", "classification")
RUN_NAME = "run"
"""Both runtimes write to a directory of this name: it names the run in every message."""


def tiny_flex_config(model_dir: Path, data_file: Path) -> RunConfig:
    """One FLEx round, two clients (a pathological split over two Dolly categories)."""
    return tiny_config(
        model_dir,
        data_file,
        ["flex"],
        seed=3,
        train={"rounds": 1},
        data={"partition": "pathological", "categories": list(CATEGORIES), "test_per_client": 2},
    )


# --- exporting each client's data for its SuperNode ---------------------------------------------


def test_exported_data_dirs_give_each_client_exactly_its_embedded_records(tmp_path):
    source = write_small_dolly(tmp_path / "small.jsonl")
    # Awkward text must survive the JSONL round trip: line separators, quotes, a FedIT client id.
    lines = source.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first.update(response='a "quoted"\u2028line\nand more', fedit_client=7)
    source.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n", encoding="utf-8")
    cfg = tiny_flex_config(tmp_path / "no-model-needed", source)

    dirs = export_client_data(cfg, tmp_path / "nodes")

    partition = task.partition_for(cfg)
    assert [d.name for d in dirs] == list(CATEGORIES)
    for client, data_dir in zip(partition.clients, dirs, strict=True):
        exported = task.client_data(cfg, client.client_id, str(data_dir))
        assert exported == client, "same records, same order, same name as embedded"
    assert any(r.fedit_client == 7 for c in partition.clients for r in c.train + c.test)
    manifest = json.loads((tmp_path / "nodes" / "partition.json").read_text())
    assert manifest["hash"] == partition.hash
    assert manifest["data_dirs"] == {"0": str(dirs[0]), "1": str(dirs[1])}
    assert load_run_config(str(tmp_path / "nodes" / "config.resolved.json")) == cfg


def test_export_command_prints_node_configs_and_refuses_a_used_directory(tmp_path, capsys):
    cfg = tiny_flex_config(tmp_path, write_small_dolly(tmp_path / "small.jsonl"))
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    nodes = tmp_path / "nodes"

    export_main([str(config_file), str(nodes)])

    assert capsys.readouterr().out.splitlines() == [
        f'partition-id={i} num-partitions=2 data-dir="{nodes / name}"'
        for i, name in enumerate(CATEGORIES)
    ]
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(config_file), str(nodes)])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ExportError, match="not empty"):
        export_client_data(cfg, nodes)


def test_clients_with_unsafe_names_get_directories_named_by_id():
    assert client_dir_name(3, "closed_qa") == "closed_qa"
    assert client_dir_name(3, "../etc") == "client-3"
    assert client_dir_name(3, "a b") == "client-3"
    assert client_dir_name(3, ".hidden") == "client-3"


# --- the deployment: real flexmoe apps against the embedded runtime ---------------------------


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_lm_dir):
    """One TLS + auth deployment (2 SuperNodes) that ran FLEx; the same config run embedded."""
    root = tmp_path_factory.mktemp("deployment")
    cfg = tiny_flex_config(tiny_lm_dir, write_small_dolly(root / "small.jsonl"))
    run_methods(cfg, root / "embedded" / RUN_NAME)

    data_dirs = export_client_data(cfg, root / "nodes")
    node_configs = [
        {"data-dir": str(data_dir), "state-dir": str(root / f"state-{i}")}
        for i, data_dir in enumerate(data_dirs)
    ]
    # Neither app sets torch's thread count, so OMP_NUM_THREADS does: the same as this process.
    threads = str(torch.get_num_threads())
    env = {"FLEXMOE_THREADS": threads, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    with LocalDeployment(APP_DIR, num_supernodes=2, node_configs=node_configs, env=env) as dep:
        assert dep.certificates is not None and dep.auth
        intruder = dep.start_supernode({"partition-id": 1, "num-partitions": 2}, register=False)
        completed = dep.run(
            {
                "config": str(root / "nodes" / "config.resolved.json"),
                "method": "flex",
                "run-dir": str(root / "deployed" / RUN_NAME),
            }
        )
        yield SimpleNamespace(
            root=root, deployment=dep, completed=completed, intruder=intruder, cfg=cfg
        )
        popens = [process.popen for process in dep.processes]
    assert all(popen.poll() is not None for popen in popens), "teardown ends every component"


@pytest.mark.slow
def test_deployed_flex_matches_embedded_bitwise(deployed):
    embedded = deployed.root / "embedded" / RUN_NAME
    remote = deployed.root / "deployed" / RUN_NAME
    assert deployed.completed.status == "finished:completed"
    assert "flex round 1/1" in deployed.completed.log

    expected = dict(np.load(embedded / "flex" / "final_shared.npz"))
    actual = dict(np.load(remote / "flex" / "final_shared.npz"))
    assert actual.keys() == expected.keys() and expected
    for key in expected:
        assert actual[key].dtype == np.float32
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)

    def train_losses(run_dir: Path) -> list[dict]:
        rounds = (run_dir / "flex" / "rounds.jsonl").read_text().splitlines()
        return [
            {pid: c["train-loss"] for pid, c in json.loads(line)["clients"].items()}
            for line in rounds
        ]

    assert train_losses(remote) == train_losses(embedded)
    for pid in (0, 1):
        # The SuperNode of partition `pid` kept that client's state in its own state-dir.
        deployed_client = deployed.root / f"state-{pid}" / RUN_NAME / "flex" / f"client-{pid}"
        embedded_client = embedded / "state" / RUN_NAME / "flex" / f"client-{pid}"
        personal = Path("round-0001") / "personal" / "personal_state.safetensors"
        mine, theirs = load_file(deployed_client / personal), load_file(embedded_client / personal)
        assert mine.keys() == theirs.keys() and mine
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        # Evaluation restored that state from disk in a fresh process: same generated text.
        predictions = "predictions.jsonl"
        assert (deployed_client / predictions).read_text() == (
            embedded_client / predictions
        ).read_text()
        other = deployed.root / f"state-{pid}" / RUN_NAME / "flex" / f"client-{1 - pid}"
        assert not other.exists(), "a node holds only its own client's state"


@pytest.mark.slow
def test_unregistered_supernode_is_refused(deployed):
    intruder = deployed.intruder
    deadline = time.monotonic() + 30
    while intruder.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert intruder.popen.poll() not in (None, 0), "the SuperLink must refuse the node"
    assert "Failed to activate SuperNode" in intruder.log.read_text()
    assert deployed.deployment.node_statuses() == ["online", "online"]


@pytest.mark.slow
def test_a_failing_run_raises_with_the_server_traceback(deployed):
    missing = deployed.root / "no-such-config.json"
    run_config = {"config": str(missing), "method": "flex", "run-dir": str(deployed.root / "x")}
    with pytest.raises(DeploymentError, match="finished:failed") as error:
        deployed.deployment.run(run_config)
    assert missing.name in str(error.value), "the ServerApp's error is in the report"


# --- building blocks ----------------------------------------------------------------------------


def test_app_declares_the_run_config_the_server_app_reads():
    assert app_config_keys(APP_DIR) == {"config", "method", "run-dir", "stop-after"}
    with (APP_DIR / "pyproject.toml").open("rb") as f:
        flwr = tomllib.load(f)["tool"]["flwr"]
    assert flwr["app"]["components"] == {
        "serverapp": "flexmoe.federated.server_app:app",
        "clientapp": "flexmoe.federated.client_app:app",
    }
    assert "federations" not in flwr, "flwr 1.41 would rewrite the file to migrate it"


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
    with pytest.raises(DeploymentError, match=r"not declared.*run-dir"):
        deployment.run({"no-such-key": 1})
    with pytest.raises(DeploymentError, match="not running"):
        deployment.run({"method": "flex"})
    with pytest.raises(DeploymentError, match=r"no pyproject\.toml"):
        LocalDeployment(tmp_path)
    with pytest.raises(DeploymentError, match="one mapping per SuperNode"):
        LocalDeployment(APP_DIR, num_supernodes=2, node_configs=[{}])
