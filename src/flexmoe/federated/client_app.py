"""The flexmoe ClientApp: decode the server's message, call `task`, encode the reply.

A client's data and its personal-state directory come from its node config (`partition-id`,
optionally `data-dir` with train.jsonl/test.jsonl, and `state-dir`), never from the message.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexmoe.federated import drift, scaffold, task
from flexmoe.federated.config import RunConfig
from flexmoe.federated.messages import decode_run_config
from flexmoe.federated.methods import METHODS
from flexmoe.runtime import configure_threads

if os.environ.get("FLEXMOE_THREADS"):  # Flower starts this app in its own process
    configure_threads()

app = ClientApp()


def _state_dir(context: Context) -> str:
    default = Path(os.environ.get("FLEXMOE_HOME", Path.home() / ".cache" / "flexmoe")) / "state"
    return str(context.node_config.get("state-dir", default))


def _setup(msg: Message, context: Context):
    config = msg.content["config"]
    cfg: RunConfig = decode_run_config(str(config["run-config"]))
    method = METHODS[str(config["method"])]
    pid = int(context.node_config["partition-id"])
    data_dir = context.node_config.get("data-dir")
    data = task.client_data(cfg, pid, str(data_dir) if data_dir else None)
    run_name = str(config["run-name"])
    mm = task.method_model(cfg, method, run_name)
    store = task.client_store(_state_dir(context), run_name, method, pid)
    return config, cfg, mm, data, store


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random)."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, cfg, mm, data, store = _setup(msg, context)
    server_control = None
    shared_in = {}
    if "arrays" in msg.content:
        if mm.method.strategy == "scaffold":
            shared_in, server_control = scaffold.split_train_arrays(msg.content["arrays"])
        else:
            shared_in = dict(msg.content["arrays"].to_torch_state_dict())
    job = task.RoundJob(
        server_round=int(config["server-round"]),
        restore_round=int(config["restore-round"]),
        lr=float(config["lr"]),
        local_steps=int(config["local-steps"]),
        batch_size=int(config["batch-size"]),
        prox_mu=float(config.get("proximal-mu", 0.0)),
        weight_decay=cfg.train.weight_decay,
        grad_clip=cfg.train.grad_clip,
    )
    shared_out, metrics, control = task.train_client(
        mm,
        data,
        job,
        store,
        shared_in,
        cfg.seed,
        cfg.train.max_length,
        server_control,
        drift.DriftProbe.from_config(cfg),
    )
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if mm.method.aggregates:
        content["arrays"] = (
            scaffold.reply_arrays(shared_out, control["c_i"], control["new"])
            if control
            else ArrayRecord(shared_out)
        )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, cfg, mm, data, store = _setup(msg, context)
    shared_in = dict(msg.content["arrays"].to_torch_state_dict()) if "arrays" in msg.content else {}
    metrics = task.evaluate_client(
        mm,
        data,
        store,
        int(config["restore-round"]),
        shared_in,
        samples=cfg.eval.samples,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        max_length=cfg.train.max_length,
        seed=cfg.seed,
    )
    info = ConfigRecord({"name": data.name})
    return Message(RecordDict({"metrics": MetricRecord(metrics), "info": info}), reply_to=msg)
