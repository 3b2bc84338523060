"""ServerApp: FedAvg over all nodes; writes the final global arrays to `out-dir`."""

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from toyfed.task import initial_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    num_nodes = int(config["num-nodes"])
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    initial = {key: Array(value) for key, value in initial_arrays(int(config["seed"])).items()}
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=int(config["num-server-rounds"]),
    )
    if config["out-dir"]:
        out_dir = Path(str(config["out-dir"]))
        out_dir.mkdir(parents=True, exist_ok=True)
        final = {key: array.numpy() for key, array in result.arrays.items()}
        np.savez(out_dir / "final_arrays.npz", **final)
