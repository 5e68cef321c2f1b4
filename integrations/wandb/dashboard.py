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

# section -> panels; a panel is (title, kind, keys). Keys are what the TRL drop-in logs.
PANELS = {
    "Speculation": [
        ("Acceptance length", "line", ["atlas/acceptance_length"]),
        ("Speedup estimate (target passes saved)", "line", ["atlas/speedup_estimate"]),
        ("Acceptance rate", "line", ["atlas/acceptance_rate"]),
        ("Acceptance rate by draft position", "line",
         [f"atlas/acceptance_rate_pos_{i}" for i in range(8)]),
        ("Lookahead and drafted fraction", "line", ["atlas/lookahead", "atlas/drafted_fraction"]),
        ("Drafts by arm (speculator, draft kind)", "line",
         ["atlas/drafts_suffix", "atlas/drafts_suffix-dist", "atlas/drafts_neural",
          "atlas/drafts_neural-dist"]),
    ],
    "Adaptive drafter": [
        ("Drafter distillation loss", "line", ["atlas/drafter_loss"]),
        ("Drafter training vs its budget (s)", "line",
         ["atlas/drafter_train_seconds", "atlas/update_budget_seconds"]),
        ("Rollbacks of a diverging drafter", "line", ["atlas/drafter_rollbacks"]),
    ],
    "Rollout cost": [
        ("Rollout tokens/s", "line", ["atlas/tokens_per_s"]),
        ("Rollout seconds per generation", "line", ["atlas/rollout_seconds"]),
        ("Speculator update seconds", "line", ["atlas/update_seconds"]),
    ],
    "Per-step record": [
        ("Speculation per step", "table", ["atlas/speculation_table"]),
        ("Speculation plot", "media", ["atlas/speculation_plot"]),
    ],
    "Training": [
        ("Reward", "line", ["reward"]),
        ("Sampler vs trainer logprob gap", "line", ["sampling/sampling_logp_difference/max"]),
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
