"""The flexmoe ServerApp: read the run config and hand the grid to `server.serve_method`.

Run configuration keys (`[tool.flwr.app.config]` in pyproject.toml for `flwr run`):
`config` — the resolved RunConfig as JSON (or a path to a JSON/TOML/YAML file),
`method` — the method to run, `run-dir` — where the server writes checkpoints and results.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexmoe.config import ConfigError
from flexmoe.federated.client_state import state_name
from flexmoe.federated.messages import load_run_config
from flexmoe.federated.methods import resolve_methods
from flexmoe.federated.server import serve_method
from flexmoe.runtime import configure_threads

if os.environ.get("FLEXMOE_THREADS"):  # Flower starts this app in its own process
    configure_threads()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    for key in ("config", "run-dir", "method"):
        if not str(context.run_config.get(key, "")):
            raise ConfigError(f'run config key {key!r} is empty: pass --run-config "{key}=..."')
    cfg = load_run_config(str(context.run_config["config"]))
    method = resolve_methods([str(context.run_config["method"])])[0]
    run_dir = Path(str(context.run_config["run-dir"]))
    stop_after = int(context.run_config.get("stop-after", 0)) or None
    serve_method(
        grid, cfg, method, run_dir / method.name, state_name(run_dir), stop_after=stop_after
    )
