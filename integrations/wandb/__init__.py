"""Dashboards of rollout speculation for training runs (installed as
atlas_rl.integrations.wandb).

`AtlasSpeculationCallback` (added by the TRL drop-in on its own) keeps one row per logged
step of the ``atlas/*`` metrics. At the end of training it writes, to ``output_dir``,
``atlas_speculation.jsonl`` (the rows) and ``atlas_speculation.png`` (the plot), and, when
a wandb run is active (``report_to=["wandb"]``, ``WANDB_MODE=offline`` works without an
account), logs them as ``atlas/speculation_table`` (a wandb.Table) and
``atlas/speculation_plot`` (an image). The scalar ``atlas/*`` metrics reach wandb through
TRL's own logging, grouped under the ``atlas/`` section.

`dashboard.py` builds a ready wandb report for a project (see its docstring).
"""

from __future__ import annotations

import json
import os

from atlas_rl.metrics import METRIC_PREFIX, atlas_name

try:  # a TrainerCallback when transformers is there; a plain class otherwise
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover
    _Base = object

TABLE_KEY = atlas_name("speculation_table")
PLOT_KEY = atlas_name("speculation_plot")
# The metric every generation logs: a log row with it is a row of the table.
ROW_KEY = atlas_name("acceptance_length")


class AtlasSpeculationCallback(_Base):
    def __init__(self):
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and ROW_KEY in logs:
            self.rows.append({"step": state.global_step,
                              **{k: v for k, v in logs.items() if k.startswith(METRIC_PREFIX)}})

    def on_train_end(self, args, state, control, **kwargs):
        if not self.rows or not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        rows_path = os.path.join(args.output_dir, "atlas_speculation.jsonl")
        with open(rows_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        plot_path = os.path.join(args.output_dir, "atlas_speculation.png")
        try:
            from atlas_rl.plots import plot_speculation

            plot_speculation(self.rows, plot_path)
        except ImportError:
            plot_path = None
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        columns = sorted({k for row in self.rows for k in row}, key=lambda k: (k != "step", k))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in self.rows])
        payload = {TABLE_KEY: table}
        if plot_path:
            payload[PLOT_KEY] = wandb.Image(plot_path)
        wandb.log(payload)
