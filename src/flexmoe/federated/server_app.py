"""The flexmoe ServerApp: read the run config and hand the grid to `server.serve_method`.

Run configuration keys (`[tool.flwr.app.config]` in pyproject.toml for `flwr run`):
`config` — the resolved RunConfig as JSON (or a path to a JSON/TOML/YAML file),
`method` — the method to run, `run-dir` — where the server writes checkpoints and results.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexmoe.federated.messages import load_run_config
from flexmoe.federated.methods import METHODS
from flexmoe.federated.server import serve_method

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_run_config(str(context.run_config["config"]))
    method = METHODS[str(context.run_config["method"])]
    run_dir = Path(str(context.run_config["run-dir"]))
    stop_after = int(context.run_config.get("stop-after", 0)) or None
    serve_method(grid, cfg, method, run_dir / method.name, run_dir.name, stop_after=stop_after)
