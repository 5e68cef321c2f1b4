"""Plots of benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from atlas_rl.metrics import POLICY_KL, atlas_name

_COLORS = {"none": "#7f7f7f", "vllm-ngram": "#1f77b4", "vllm-suffix": "#2ca02c",
           "atlas-static": "#ff7f0e", "atlas": "#d62728", "domain-oracle": "#9467bd"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'atlas-rl[bench]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, axes, titles, xlabel: str, path: str | Path, dpi: int = 100) -> Path:
    """Titles, grids and legends on stacked panels, integer steps on the shared x axis,
    and the figure saved to `path` (its folder created)."""
    plt = _pyplot()
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel(xlabel)
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_bench(results: dict, path: str | Path) -> Path:
    """Three panels: tail acceptance length per step per method (dotted: its tokens per
    request-step, drafted or not) with the one-hot oracle ceiling and the drift point;
    tail speedup per step; median speedup per regime."""
    plt = _pyplot()
    methods = results["methods"]
    drift = results["config"].get("drift_step")
    switches = results["config"].get("phase_starts", [0, drift] if drift is not None else [0])[1:]
    fig, axes = plt.subplots(3, 1, figsize=(9, 11), constrained_layout=True)
    ax_al, ax_sp, ax_bar = axes

    for name, m in methods.items():
        steps = [r["step"] + 1 for r in m["steps"]]
        color = _COLORS.get(name)
        ax_al.plot(steps, [r["acceptance_length"] for r in m["steps"]], "o-", label=name,
                   color=color)
        est = [r.get("speedup_estimate") for r in m["steps"]]
        if name != "none" and any(x is not None for x in est):  # over every request-step
            ax_al.plot(steps, [float("nan") if x is None else x for x in est], "x:",
                       color=color, alpha=0.8, label=f"{name}: tokens per request-step")
        sp = [r["speedup"] for r in m["steps"]]
        if any(x is not None for x in sp):
            ax_sp.plot(steps, [float("nan") if x is None else x for x in sp], "o-",
                       label=name, color=color)
    if "none" in methods:
        ref = methods["none"]["steps"]
        ax_al.plot([r["step"] + 1 for r in ref], [r["oracle_acceptance_length"] for r in ref],
                   "k--", label="one-hot ceiling (k=%d)" %
                   results["config"]["max_lookahead"])
    for ax in (ax_al, ax_sp):
        for at in switches:
            ax.axvline(at + 0.5, color="k", alpha=0.4, linestyle=":")
            ax.text(at + 0.55, 0.98, " domain switch", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8)
        ax.set_xlabel("RL step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax_al.set_ylabel("acceptance length (tail)")
    drift_rows = [r for r in (results.get("drift") or {}).get("steps", [])
                  if r.get(POLICY_KL) is not None]
    if drift_rows:  # how far the policy has moved: KL from the initial policy
        ax_kl = ax_al.twinx()
        ax_kl.plot([r["step"] + 1 for r in drift_rows], [r[POLICY_KL] for r in drift_rows],
                   "s:", color="#9467bd", alpha=0.7, label="KL(pi_s || pi_0) (right axis)")
        ax_kl.set_ylabel("KL from the initial policy, nats/token", color="#9467bd")
        ax_kl.legend(fontsize=8, loc="lower right")
    ax_al.set_title("Acceptance length per step (tail regime, temperature %g); dotted: "
                    "tokens per request-step, drafted or not" % results["config"]["temperature"])
    ax_sp.axhline(1.0, color="k", linewidth=0.8)
    ax_sp.set_ylabel("speedup vs none (tail)")
    ax_sp.set_title("Speedup per step, tokens/s over no speculation in the same step")

    regimes = ["tail", "tail_rl", "large_batch"]
    names = list(methods)
    width = 0.8 / max(len(regimes), 1)
    for i, regime in enumerate(regimes):
        vals = [methods[n]["regimes"].get(regime, {}).get("speedup") for n in names]
        xs = [j + (i - (len(regimes) - 1) / 2) * width for j in range(len(names))]
        bars = ax_bar.bar(xs, [v or 0.0 for v in vals], width, label=regime.replace("_", " "))
        for x, v in zip(xs, vals):
            ax_bar.text(x, (v or 0.0) + 0.02, "n/a" if v is None else f"{v:.2f}x",
                        ha="center", fontsize=8)
        del bars
    ax_bar.axhline(1.0, color="k", linewidth=0.8)
    ax_bar.set_xticks(range(len(names)), names)
    ax_bar.set_ylabel("speedup (pooled over steps)")
    ax_bar.set_title("Speedup by regime (n/a: not exact, or not measured)")
    ax_bar.legend(fontsize=8)
    mach = results["machine"]
    fig.suptitle(f"atlas-rl bench: {results['config']['model']} on {mach['cpu']} "
                 f"({mach['cores']} cores, {mach['gpu'] or 'no GPU'})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speculation(rows: list[dict], path: str | Path) -> Path:
    """A training run's speculation per step (rows of atlas/* metrics): acceptance length
    and the speedup estimate; acceptance rate and drafted fraction; tokens/s."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), constrained_layout=True, sharex=True)

    def line(ax, key, label, style="o-"):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(steps, [float("nan") if y is None else y for y in ys], style, label=label)

    line(axes[0], atlas_name("acceptance_length"), "acceptance length")
    line(axes[0], atlas_name("speedup_estimate"), "speedup estimate (target passes saved)", "s--")
    axes[0].axhline(1.0, color="k", linewidth=0.8)
    line(axes[1], atlas_name("acceptance_rate"), "acceptance rate")
    line(axes[1], atlas_name("drafted_fraction"), "drafted request-steps", "s--")
    line(axes[2], atlas_name("tokens_per_s"), "rollout tokens/s")
    return _finish(fig, axes, ("Tokens per target pass", "Drafts", "Rollout throughput"),
                   "training step", path)


def plot_demo(rows: list[dict], switch: int, path: str | Path) -> Path:
    """The demo's GRPO runs: reward per step of both runs; atlas's acceptance length and
    rollout seconds of both, with the domain switch marked."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), constrained_layout=True, sharex=True)
    for method, color in (("none", _COLORS["none"]), ("atlas", _COLORS["atlas"])):
        axes[0].plot(steps, [r["reward"][method] for r in rows], "o-", color=color, label=method)
        axes[2].plot(steps, [r["rollout_seconds"][method] for r in rows], "o-", color=color,
                     label=method)
    axes[1].plot(steps, [r["acceptance_length"] for r in rows], "o-", color=_COLORS["atlas"],
                 label="atlas")
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    for ax in axes:
        ax.axvline(switch + 0.5, color="k", alpha=0.4, linestyle=":")
        ax.text(switch + 0.55, 0.98, " code -> math", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8)
    return _finish(fig, axes, ("Reward (mean over the step's completions)",
                               "Acceptance length (atlas)", "Rollout seconds per step"),
                   "GRPO step", path)
