"""A ready wandb dashboard for atlas-rl runs: the panel spec, and a builder for a wandb
report from it.

    python -m atlas_rl.integrations.wandb.dashboard --entity ME --project my-grpo   # builds a report
    python -m atlas_rl.integrations.wandb.dashboard --print                          # the spec as JSON

Building needs network access and ``pip install wandb-workspaces``; the spec itself
(`PANELS`) is plain data, and docs/dashboards.md describes each panel.
"""

from __future__ import annotations

import argparse
import json
import sys

from atlas_rl.integrations.wandb import PLOT_KEY, TABLE_KEY

from atlas_rl.metrics import (
    ARMS,
    CLOSED_REASONS,
    POS_PREFIX,
    TRL_LOGP_GAP,
    TRL_REWARD,
    atlas_name,
)


def _atlas(*keys: str) -> list[str]:
    return [atlas_name(k) for k in keys]


# section -> panels; a panel is (title, kind, keys). Keys are what the TRL drop-in logs
# (atlas_rl.metrics.TRAINER_METRICS and its families; TRL's own names).
PANELS = {
    "Speculation": [
        ("Acceptance length", "line", _atlas("acceptance_length")),
        ("Speedup estimate (target passes saved)", "line", _atlas("speedup_estimate")),
        ("Acceptance rate", "line", _atlas("acceptance_rate")),
        ("Acceptance rate by draft position", "line",
         _atlas(*(f"{POS_PREFIX}{i}" for i in range(8)))),
        ("Lookahead and drafted fraction", "line", _atlas("lookahead", "drafted_fraction")),
        ("Drafts by arm (speculator, draft kind)", "line",
         _atlas(*(f"drafts_{arm}" for arm in ARMS))),
        ("Steps without drafting, by reason", "line",
         _atlas(*(f"closed_by_{r}" for r in CLOSED_REASONS), "closed_probe_steps")),
    ],
    "Adaptive drafter": [
        ("Drafter distillation loss", "line", _atlas("drafter_loss")),
        ("Drafter training vs its budget (s)", "line",
         _atlas("drafter_train_seconds", "update_budget_seconds")),
        ("Rollbacks of a diverging drafter", "line", _atlas("drafter_rollbacks")),
    ],
    "Rollout cost": [
        ("Rollout tokens/s", "line", _atlas("tokens_per_s")),
        ("Rollout seconds per generation", "line", _atlas("rollout_seconds")),
        ("Speculator update seconds", "line", _atlas("update_seconds")),
    ],
    "Per-step record": [
        ("Speculation per step", "table", [TABLE_KEY]),
        ("Speculation plot", "media", [PLOT_KEY]),
    ],
    "Training": [
        ("Reward", "line", [TRL_REWARD]),
        ("Sampler vs trainer logprob gap", "line", [TRL_LOGP_GAP]),
    ],
}


def spec() -> dict:
    return {section: [{"title": t, "kind": k, "keys": keys} for t, k, keys in panels]
            for section, panels in PANELS.items()}


def build_report(entity: str, project: str, title: str = "atlas-rl: rollout speculation"):
    """Create (and save) a wandb report with the panels above; returns its URL."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise ImportError("building the report needs wandb-workspaces: pip install "
                          "wandb-workspaces (the panel spec is `spec()`)") from e
    blocks = [wr.H1(title)]
    for section, panels in PANELS.items():
        blocks.append(wr.H2(section))
        plots = []
        for panel_title, kind, keys in panels:
            if kind == "line":
                plots.append(wr.LinePlot(title=panel_title, y=keys))
            elif kind == "table":
                plots.append(wr.WeavePanelSummaryTable(table_name=keys[0]))
            else:
                plots.append(wr.MediaBrowser(media_keys=keys))
        blocks.append(wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project)],
                                   panels=plots))
    report = wr.Report(entity=entity, project=project, title=title, blocks=blocks)
    report.save()
    return report.url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="atlas-rl's wandb dashboard")
    p.add_argument("--entity")
    p.add_argument("--project")
    p.add_argument("--print", action="store_true", help="print the panel spec as JSON")
    args = p.parse_args(argv)
    if args.print or not (args.entity and args.project):
        print(json.dumps(spec(), indent=2))
        return 0
    print(build_report(args.entity, args.project))
    return 0


if __name__ == "__main__":
    sys.exit(main())
