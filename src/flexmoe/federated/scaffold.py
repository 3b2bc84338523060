"""SCAFFOLD (Karimireddy et al., ICML 2020): FedAvg plus control variates that cancel client drift.

The server holds the global arrays x and a server control variate c; client i holds its own c_i
(on its own disk, across rounds). Each round:
- the server sends x and c;
- the client takes K local steps from y_i = x on the corrected gradient g + c - c_i, then
  (option II of the paper) sets c_i+ = c_i - c + (x - y_i) / (K * lr) and sends back y_i and
  delta_c_i = c_i+ - c_i;
- the server updates x <- x + lr_g * mean_i(y_i - x) and c <- c + (|S|/N) * mean_i(delta_c_i),
  S being the clients that replied and N all clients. Both means are unweighted, as in the paper,
  so the method minimises the plain mean of the client objectives.

On the wire both directions carry one ArrayRecord, the shape Flower's strategies expect: the model
keys plus `scaffold.c.<key>` (server -> client: c) or `scaffold.dc.<key>` (client -> server:
delta_c_i). The client-side helpers below work on dicts of torch tensors and know nothing of
Flower beyond packing and unpacking that record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from safetensors.torch import load_file, save_file

SERVER_CONTROL_PREFIX = "scaffold.c."
"""Keys of the server control variate c in the server's train message."""
CONTROL_DELTA_PREFIX = "scaffold.dc."
"""Keys of a client's control delta in its train reply."""

Tensors = dict[str, torch.Tensor]


class ScaffoldError(ValueError):
    """Arrays or control variates that do not fit together; the message says which keys."""


class Scaffold(FedAvg):
    """SCAFFOLD as a Flower strategy; `fedavg_options` are FedAvg's (sampling, record keys)."""

    def __init__(self, *, num_clients: int, server_lr: float = 1.0, **fedavg_options: Any) -> None:
        super().__init__(**fedavg_options)
        if num_clients < 1:
            raise ScaffoldError(f"num_clients (N, all clients) must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.server_lr = server_lr
        self.control: dict[str, np.ndarray] | None = None
        """The server control variate c (float32), created as zeros in the first round."""
        self._global: dict[str, np.ndarray] = {}
        """x of the current round, kept to compute the clients' updates y_i - x."""

    def summary(self) -> None:
        log(INFO, "\t├──> SCAFFOLD: server lr %s, N = %d clients", self.server_lr, self.num_clients)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send x together with c (as `scaffold.c.<key>` arrays in the same record)."""
        self._global = {k: v.numpy() for k, v in arrays.items()}
        reserved = [k for k in self._global if k.startswith("scaffold.")]
        if reserved:
            raise ScaffoldError(f"array keys may not start with 'scaffold.': {reserved[:3]}")
        if self.control is None:
            self.control = {k: np.zeros(v.shape, np.float32) for k, v in self._global.items()}
        _check_same_keys(self.control, self._global, "server control c", "global arrays x")
        outgoing = ArrayRecord(
            {
                **{k: Array(v) for k, v in self._global.items()},
                **{SERVER_CONTROL_PREFIX + k: Array(v) for k, v in self.control.items()},
            }
        )
        return super().configure_train(server_round, outgoing, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if len(valid) > self.num_clients:
            raise ScaffoldError(
                f"{len(valid)} replies but num_clients is {self.num_clients}: "
                "set num_clients to the total number of clients"
            )
        contents = [m.content for m in valid]
        updates, deltas = [], []
        for content in contents:
            record = next(iter(content.array_records.values()))
            y, delta = split_reply_arrays({k: v.numpy() for k, v in record.items()})
            _check_same_keys(y, self._global, "a client's arrays y_i", "global arrays x")
            _check_same_keys(delta, self._global, "a client's control delta", "global arrays x")
            updates.append(y)
            deltas.append(delta)
        assert self.control is not None  # set by configure_train
        new_arrays = {}
        for key, x in self._global.items():
            mean_update = np.mean([y[key].astype(np.float64) - x for y in updates], axis=0)
            new_arrays[key] = (x + self.server_lr * mean_update).astype(x.dtype)
            delta_sum = np.sum([d[key].astype(np.float64) for d in deltas], axis=0)
            self.control[key] = (self.control[key] + delta_sum / self.num_clients).astype(
                np.float32
            )
        self._global = {}  # x is the strategy's result now; keep only c (smaller checkpoints)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in new_arrays.items()}), metrics


def split_reply_arrays(arrays: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A client reply's arrays -> (y_i, delta_c_i), by key prefix."""
    y = {k: v for k, v in arrays.items() if not k.startswith(CONTROL_DELTA_PREFIX)}
    delta = {
        k.removeprefix(CONTROL_DELTA_PREFIX): v
        for k, v in arrays.items()
        if k.startswith(CONTROL_DELTA_PREFIX)
    }
    return y, delta


def _check_same_keys(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> None:
    if a.keys() != b.keys():
        missing, extra = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
        raise ScaffoldError(
            f"{a_name} and {b_name} have different keys: missing {missing[:3]}, extra {extra[:3]} "
            f"({len(missing)} missing, {len(extra)} extra)"
        )


# --- client side -------------------------------------------------------------------------------


def split_train_arrays(record: ArrayRecord) -> tuple[Tensors, Tensors]:
    """The server's train record -> (x, c) as float32 tensors (c has x's keys)."""
    arrays = record.to_torch_state_dict()
    x = {k: v.float() for k, v in arrays.items() if not k.startswith(SERVER_CONTROL_PREFIX)}
    c = {
        k.removeprefix(SERVER_CONTROL_PREFIX): v.float()
        for k, v in arrays.items()
        if k.startswith(SERVER_CONTROL_PREFIX)
    }
    _check_same_keys(c, x, "server control c", "arrays x")
    return x, c


def load_client_control(path: str | Path, like: Mapping[str, torch.Tensor]) -> Tensors:
    """This client's c_i from `path`, or zeros shaped like `like` (its first round)."""
    path = Path(path)
    if not path.is_file():
        return {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in like.items()}
    control = load_file(path)
    _check_same_keys(control, like, f"client control in {path}", "the server's arrays")
    return control


def save_client_control(path: str | Path, control: Mapping[str, torch.Tensor]) -> None:
    """Write c_i atomically (a temporary file renamed into place), so a crash never leaves half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in control.items()}, tmp)
    tmp.replace(path)


def control_correction(c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor]) -> Tensors:
    """c - c_i: what SCAFFOLD adds to every local gradient this round."""
    _check_same_keys(c_i, c, "client control c_i", "server control c")
    return {k: c[k] - c_i[k] for k in c}


def correct_gradients(
    params: Mapping[str, torch.nn.Parameter], correction: Mapping[str, torch.Tensor]
) -> None:
    """g <- g + (c - c_i) for every parameter, in place; call after backward, before the step.

    Parameters without a gradient (unused in this batch) get the correction as their gradient.
    """
    _check_same_keys(params, correction, "trained parameters", "the control variates")
    for name, param in params.items():
        corr = correction[name].to(device=param.device, dtype=param.dtype)
        if param.grad is None:
            param.grad = corr.clone()
        else:
            param.grad.add_(corr)


def updated_client_control(
    c_i: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    num_steps: int,
    lr: float,
) -> Tensors:
    """Option II: c_i+ = c_i - c + (x - y) / (num_steps * lr).

    With a learning rate that changes within the round, pass the mean lr of its steps.
    """
    if num_steps < 1 or lr <= 0:
        raise ScaffoldError(f"need num_steps >= 1 and lr > 0, got {num_steps} and {lr}")
    _check_same_keys(y, x, "local arrays y", "global arrays x")
    scale = 1.0 / (num_steps * lr)
    return {k: c_i[k] - c[k] + (x[k].float() - y[k].detach().float()) * scale for k in x}


def reply_arrays(
    y: Mapping[str, torch.Tensor],
    c_i: Mapping[str, torch.Tensor],
    new_c_i: Mapping[str, torch.Tensor],
) -> ArrayRecord:
    """The client's train reply record: y_i and delta_c_i = new_c_i - c_i (float32)."""
    _check_same_keys(new_c_i, y, "new client control", "local arrays y")
    arrays = {k: v.detach().float().cpu() for k, v in y.items()}
    arrays |= {CONTROL_DELTA_PREFIX + k: (new_c_i[k] - c_i[k]).float().cpu() for k in y}
    return ArrayRecord(arrays)
