"""The GPU check's projection and report (`atlas_rl.gpu_bench` measures, this file turns
the measurements into the projected rollout speedup and the markdown of docs/gpu.md)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from atlas_rl.metrics import fmt

#: the drafter issue's target acceptance length, and the lookahead it is projected at
TARGET_ACCEPTANCE_LENGTH, TARGET_LOOKAHEAD = 2.6, 3
CPU_BENCH = (Path(__file__).resolve().parent.parent / "docs" / "bench"
             / "drift-smollm2-135m-cpu.json")
DRAFTER_OF_RECORD_REPORT = (Path(__file__).resolve().parent / "assets" / "speculators"
                            / "smollm2-135m-instruct" / "eagle3_train_report.json")


def _interp(x: float, xs, ys) -> float:
    """Piecewise-linear interpolation (constant beyond the ends; points at the same x
    averaged, e.g. verification of 8 x 8 and 64 x 1 drafts)."""
    groups: dict[float, list[float]] = {}
    for xi, yi in zip(xs, ys, strict=True):
        groups.setdefault(float(xi), []).append(yi)
    pts = sorted((xi, sum(v) / len(v)) for xi, v in groups.items())
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def drafter_of_record_acceptance(lookahead: int = TARGET_LOOKAHEAD) -> dict | None:
    """The bundled drafter of record's measured acceptance (its distillation's held-out
    rollouts, distribution drafts at T = 1; `eagle3_train_report.json`): per-position
    acceptance a_i gives tau(L) = 1 + a_1 + a_1 a_2 + ... over L positions."""
    try:
        report = json.loads(DRAFTER_OF_RECORD_REPORT.read_text())
        per_position = report["heldout_final"]["distribution"]
    except (OSError, KeyError, ValueError):
        return None
    lookahead = min(lookahead, len(per_position))
    tau, run = 1.0, 1.0
    for a in per_position[:lookahead]:
        run *= a
        tau += run
    return {"name": f"drafter of record (held-out) at lookahead {lookahead}",
            "acceptance_length": tau, "lookahead": lookahead, "drafter": True,
            "per_position": per_position[:lookahead],
            "trained_tokens": report.get("train_tokens")}


def acceptance_sources(bench_path: Path) -> list[dict]:
    """Acceptance lengths to project with: the CPU benchmark of record (vLLM on
    SmolLM2-135M, temperature 1; the tail regime, a few sequences), and the drafter
    issue's target."""
    sources = []
    try:
        methods = json.loads(Path(bench_path).read_text())["methods"]
        for method in ("atlas", "atlas-static", "vllm-ngram", "vllm-suffix"):
            tail = methods.get(method, {}).get("regimes", {}).get("tail")
            if tail and tail.get("lookahead"):
                sources.append({"name": f"{method} (CPU bench)", "acceptance_length":
                                tail["acceptance_length"], "lookahead": tail["lookahead"],
                                "drafter": method.startswith("atlas")})
    except (OSError, KeyError, ValueError) as e:
        sources.append({"name": f"CPU bench unreadable: {e}", "acceptance_length": None})
    record = drafter_of_record_acceptance()
    if record is not None:
        sources.append(record)
    sources.append({"name": f"target (drafter issue) at lookahead {TARGET_LOOKAHEAD}",
                    "acceptance_length": TARGET_ACCEPTANCE_LENGTH,
                    "lookahead": TARGET_LOOKAHEAD, "drafter": True, "target": True})
    return sources


def project(report: dict, bench_path: Path) -> dict:
    """speedup(B) = tau * T(B, 1) / (T(B, 1 + L) + D(B, L) + V(B, L)), per policy model,
    batch size B and acceptance source (tau acceptance length = tokens per sequence per
    step, L mean lookahead): T from the step-cost curve (linear between token counts), D
    the neural drafter's propose time at lookahead L (linear between the measured
    lookaheads; 0 for the model-free vLLM drafters), V the Triton verification of B x L
    one-hot drafts over the model's vocabulary (linear in B * L between measured sizes)."""
    stages = report.get("stages", {})
    step = stages.get("step", {}).get("models", {})
    verify = [r for r in stages.get("verify", {}).get("rows", []) if r["q"] == "one-hot"]
    drafter = stages.get("drafter", {}).get("models", {})
    if not step:
        raise RuntimeError("no step-cost results to project from")
    sources = acceptance_sources(bench_path)
    tables = {}
    for model, data in step.items():
        rows = [r for r in data["rows"] if "best_ms" in r]
        vocab = data.get("vocab_size")
        vrows = [r for r in verify if r["vocab"] == vocab] or verify
        drows = drafter.get(model, {}).get("rows", [])
        out = []
        for batch in sorted({r["batch"] for r in rows}):
            curve = {r["tokens"]: r["best_ms"] for r in rows if r["batch"] == batch}
            if 1 not in curve:
                continue
            entry = {"batch": batch, "step_1_token_ms": curve[1]}
            for src in sources:
                tau, la = src.get("acceptance_length"), src.get("lookahead")
                if not tau or not la:
                    continue
                t_spec = _interp(1 + la, list(curve), list(curve.values()))
                v = _interp(batch * la, [r["batch"] * r["lookahead"] for r in vrows],
                            [r.get("best_us", r["triton_us"]) / 1e3 for r in vrows]) \
                    if vrows else 0.0
                d = 0.0
                if src.get("drafter") and drows:
                    ks = _propose_ks(drows[0])
                    # the graphed drafting loop where measured (what runs on CUDA)
                    key = "propose_graph_k{}_ms" if "propose_graph_k1_ms" in drows[0] \
                        else "propose_k{}_ms"
                    per_k = [_interp(batch, [r["batch"] for r in drows],
                                     [r[key.format(k)] for r in drows]) for k in ks]
                    d = _interp(la, ks, per_k) if len(ks) > 1 else per_k[0] * la / ks[0]
                entry[src["name"]] = tau * curve[1] / (t_spec + d + v)
            out.append(entry)
        tables[model] = out
    return {"formula": "speedup(B) = tau * T(B,1) / (T(B,1+L) + D(B,L) + V(B,L))",
            "sources": sources, "tables": tables}


def _fmt(x, spec=".2f"):
    return fmt(None if isinstance(x, float) and math.isnan(x) else x, spec)


def render_markdown(report: dict) -> str:
    st, lines = report.get("stages", {}), []
    env = st.get("env", {})
    smoke = report.get("cpu_smoke")
    lines.append("## GPU check results"
                 + (" (--cpu-smoke: toy sizes, not measurements)" if smoke else ""))
    lines.append("")
    if env:
        cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
        lines.append(f"Machine: {env.get('gpu') or env.get('cpu')}; torch {env.get('torch')}, "
                     f"Triton {env.get('triton')}, transformers {env.get('transformers')}{cuda}. "
                     f"Copy bandwidth (measured, device to device): "
                     f"{_fmt(env.get('copy_bandwidth_gb_s'), '.0f')} GB/s; nominal HBM: "
                     f"{_fmt(env.get('nominal_hbm_gb_s'), '.0f')} GB/s (H100 SXM 3,350; "
                     "H100 PCIe 2,000; H200 4,800).")
        lines.append("")
    if "tests" in report:
        lines += [f"Tests marked `gpu`: {report['tests']}", ""]
    lines += _md_verify(st.get("verify"), env) + _md_drafter(st.get("drafter"), st.get("step"))
    lines += _md_proposer(st.get("proposer"), st.get("step"))
    lines += _md_step(st.get("step"),
                      "Policy step cost (ms per forward, best of eager and CUDA graph)")
    if st.get("compile", {}).get("models"):
        lines += _md_step(st["compile"], "torch.compile (ms per forward, best of the compiled "
                                         "module and its CUDA graph)")
    lines += _md_project(st.get("project")) + _md_targets(st)
    partial = [name for name, stage in st.items() if stage.get("partial") or stage.get("cut_short")]
    if partial:
        lines += [f"Cut short by their time limits (results above are partial): "
                  f"{', '.join(partial)}.", ""]
    if report.get("errors"):
        lines += ["### Errors", ""]
        for stage, err in report["errors"].items():
            lines += [f"- `{stage}`: " + err.strip().splitlines()[-1][:300]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_verify(v, env) -> list[str]:
    if not v or not v.get("rows"):
        return []
    out = ["### Verification: Triton vs torch reference", "",
           f"Achieved bandwidth = logits bytes / time; limit = reading the logits once at the "
           f"measured copy bandwidth ({_fmt(env.get('copy_bandwidth_gb_s'), '.0f')} GB/s). "
           "Identical = same tokens from both on the same uniforms (logprobs within "
           "tolerance).", "",
           "Triton us: the kernels launched one by one (before); graph us: the same kernels "
           "replayed as a CUDA graph per batch bucket, inputs copied into its buffers (after; "
           "'-' where the logits exceed the graph limit and calls launch eagerly). Times are "
           "per call, calls issued back to back.", "",
           "| vocab | q | batch x lookahead | Triton us | graph us | torch us | speedup "
           "| GB/s (best) | % of limit (best) | identical |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        best = r.get("best_us", r["triton_us"])
        frac = r.get("best_fraction_of_limit", r["fraction_of_limit"])
        same = r["identical"] and r.get("graph_identical") in (None, True)
        out.append(f"| {r['vocab']} | {r['q']} | {r['batch']} x {r['lookahead']} | "
                   f"{r['triton_us']:.1f} | {_fmt(r.get('graph_us'), '.1f')} | "
                   f"{r['torch_us']:.1f} | {r['torch_us'] / best:.1f}x | "
                   f"{r['logits_mb'] * 1e6 / best / 1e3:.0f} | {100 * frac:.0f}% | "
                   f"{'yes' if same else 'NO'} |")
    return out + [""]


def _md_proposer(p, step) -> list[str]:
    if not p or not p.get("rows"):
        return []
    out = [f"### Proposer step: host path vs device path ({p['model']} shape, neural drafter "
           f"{p['dtype']}, lookahead {p['lookahead']})", "",
           "`AtlasProposer.propose` per engine step, driven as vLLM's runner drives it "
           "(`backends.vllm.harness`), wall time with its device work waited for. Host path "
           "(before): hidden states copied to the host, drafting launched op by op, drafts "
           "read back inside the step, lists handed over. Device path (after): hidden states "
           "stay on the device, the drafting loop replayed as a CUDA graph, a [requests, k] "
           "device tensor handed over, its host copy read by the next step.", "",
           "| batch | host path ms | syncs | device path ms | syncs | handed | "
           "device / forward |", "|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        fwd = _forward_ms(step, p["model"], r["batch"])
        out.append(f"| {r['batch']} | {r['host_ms']:.3f} | {_fmt(r.get('host_syncs'), 'd')} | "
                   f"{r['device_ms']:.3f} | {_fmt(r.get('device_syncs'), 'd')} | "
                   f"{r.get('device_handed')} | "
                   f"{_fmt(100 * r['device_ms'] / fwd, '.0f') + '%' if fwd else '-'} |")
    calls = next((r["host_sync_calls"] for r in p["rows"] if r.get("host_sync_calls")), None)
    if calls:
        out += ["", "Host path syncs, e.g.: " + "; ".join(calls[:2])]
    return out + [""]


def _forward_ms(step, model, batch, tokens=1):
    for r in (step or {}).get("models", {}).get(model, {}).get("rows", []):
        if r["batch"] == batch and r["tokens"] == tokens and "best_ms" in r:
            return r["best_ms"]
    return None


def _md_drafter(d, step) -> list[str]:
    if not d or not d.get("models"):
        return []
    out = ["### Drafter (NeuralSpeculator, " + d.get("dtype", "") + ")", ""]
    for name, m in d["models"].items():
        ks = _propose_ks(m["rows"][0] if m["rows"] else {})
        graphed = any("propose_graph_k1_ms" in r for r in m["rows"])
        cols = [(f"propose_k{k}_ms", f"propose k={k} ms") for k in ks]
        if graphed:
            cols += [(f"propose_graph_k{k}_ms", f"graphed k={k} ms") for k in ks]
        out += [f"{name} shape (hidden {m['hidden_size']}): propose per step vs the policy's "
                "forward of the same batch (1 token per sequence)"
                + ("; propose launches the drafting loop op by op (before), graphed replays "
                   "it as a CUDA graph (after)." if graphed else "."), "",
                "| batch | " + " | ".join(c[1] for c in cols)
                + " | one position, device ms | policy forward ms | propose k=1 / forward |",
                "|---|" + "---|" * (len(cols) + 3)]
        for r in m["rows"]:
            fwd = _forward_ms(step, name, r["batch"])
            ratio = r["propose_k1_ms"] / fwd if fwd and "propose_k1_ms" in r else None
            cells = " | ".join(_fmt(r.get(c[0]), ".3f") for c in cols)
            out.append(f"| {r['batch']} | {cells}"
                       + f" | {_fmt(r['draft_position_device_ms'], '.3f')} | {_fmt(fwd)} | "
                       f"{_fmt(100 * ratio, '.0f') + '%' if ratio else '-'} |")
        out.append("")
        syncs = m.get("host_syncs_per_propose")
        if syncs is not None:
            out += [f"Host syncs in one propose call (torch sync debug mode): {len(syncs)}"
                    + (": " + "; ".join(syncs) if syncs else ""), ""]
        t = m.get("training", {})
        if t:
            out += [f"Online training: {t.get('rows')} rows in {_fmt(t.get('seconds'), '.3f')} s "
                    f"({_fmt(t.get('ms_per_minibatch'))} ms per minibatch), weights moved: "
                    f"{t.get('weights_moved')}, parameters {t.get('param_dtype')} on "
                    f"{t.get('param_device')}.", ""]
    return out


def _propose_ks(row: dict) -> list[int]:
    """The lookaheads a drafter row was measured at (``propose_k{k}_ms`` keys)."""
    return sorted(int(k[len("propose_k"):-3]) for k in row
                  if k.startswith("propose_k") and k.endswith("_ms"))


def _md_step(s, title) -> list[str]:
    if not s or not s.get("models"):
        return []
    out = [f"### {title}", "",
           f"Static KV cache of {s.get('context')} positions, {s.get('dtype')}, random weights.",
           ""]
    for name, m in s["models"].items():
        toks = sorted({r["tokens"] for r in m["rows"]})
        if m.get("error") or not m["rows"]:
            out += [f"{name}: not measured ({m.get('error') or 'out of time'})", ""]
            continue
        out += [f"{name} ({m['params_m']:.1f}M parameters)", "",
                "| batch | " + " | ".join(f"{t} tok" for t in toks) + " |",
                "|---|" + "---|" * len(toks)]
        for b in sorted({r["batch"] for r in m["rows"]}):
            cells = {r["tokens"]: r for r in m["rows"] if r["batch"] == b}
            out.append(f"| {b} | " + " | ".join(
                _fmt(cells.get(t, {}).get("best_ms")) if "error" not in cells.get(t, {}) else "err"
                for t in toks) + " |")
        graphs = [r for r in m["rows"] if "graph_error" in r]
        if graphs:
            out.append(f"\nCUDA graph capture failed on {len(graphs)} shapes (eager times used): "
                       f"{graphs[0]['graph_error']}")
        out.append("")
    return out


def _md_project(p) -> list[str]:
    if not p or not p.get("tables"):
        return []
    out = ["### Projected rollout speedup (a projection, not a measured rollout)", "",
           f"`{p['formula']}`: tau = acceptance length (tokens per sequence per step), L = mean "
           "lookahead; T = policy step cost above (linear between token counts), D = drafter "
           "propose time at lookahead L (neural drafter only), V = Triton verification time "
           "(one-hot q, the model's vocabulary). Sampling, scheduling and the trainer are "
           "left out on both sides.", "", "Acceptance sources:"]
    for s in p["sources"]:
        out.append(f"- {s['name']}: tau = {_fmt(s.get('acceptance_length'))}, L = "
                   f"{_fmt(s.get('lookahead'))}")
    out.append("")
    names = [s["name"] for s in p["sources"] if s.get("acceptance_length")]
    for model, rows in p["tables"].items():
        out += [f"{model}", "", "| batch | step ms | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for r in rows:
            out.append(f"| {r['batch']} | {_fmt(r['step_1_token_ms'])} | "
                       + " | ".join(f"{_fmt(r.get(n))}x" for n in names) + " |")
        out.append("")
    return out


def _md_targets(st) -> list[str]:
    """The issue's targets, checked against what this run measured."""
    out = ["### Targets", ""]
    v = [r for r in st.get("verify", {}).get("rows", []) if r["batch"] >= 64]
    if v:
        worst_f = min(v, key=lambda r: r["fraction_of_limit"])
        worst_s = min(v, key=lambda r: r["speedup_vs_torch"])
        ok = worst_f["fraction_of_limit"] >= 0.7 and worst_s["speedup_vs_torch"] >= 3
        out.append(f"- Verification at batch >= 64: >= 70% of the read-once limit and >= 3x torch: "
                   f"{'met' if ok else 'NOT met'} (lowest "
                   f"{100 * worst_f['fraction_of_limit']:.0f}% at V={worst_f['vocab']} "
                   f"{worst_f['q']} {worst_f['batch']}x{worst_f['lookahead']}; "
                   f"lowest speedup {worst_s['speedup_vs_torch']:.1f}x at {worst_s['batch']}x"
                   f"{worst_s['lookahead']}).")
    d = st.get("drafter", {}).get("models", {})
    first = next(iter(d), None)
    if first:
        ratios = [(r["propose_k1_ms"] / f, r["batch"]) for r in d[first]["rows"]
                  if r["batch"] <= 8 and (f := _forward_ms(st.get("step"), first, r["batch"]))]
        if ratios:
            worst = max(ratios)
            out.append(f"- Drafting one position at batch <= 8 <= 10% of a {first} forward: "
                       f"{'met' if worst[0] <= 0.10 else 'NOT met'} (highest {100 * worst[0]:.0f}% "
                       f"at batch {worst[1]}).")
    small_v = [r for r in st.get("verify", {}).get("rows", [])
               if r["batch"] <= 8 and r.get("graph_us") is not None]
    if small_v:
        worst = max(small_v, key=lambda r: r["graph_us"])
        out.append(f"- Verification at batch <= 8 <= 60 us per call (CUDA graph): "
                   f"{'met' if worst['graph_us'] <= 60 else 'NOT met'} (highest "
                   f"{worst['graph_us']:.0f} us at V={worst['vocab']} {worst['q']} "
                   f"{worst['batch']}x{worst['lookahead']}; launched one by one "
                   f"{worst['triton_us']:.0f} us).")
    prop = [r for r in st.get("proposer", {}).get("rows", []) if r["batch"] <= 8]
    if prop:
        worst = max(prop, key=lambda r: r["device_ms"])
        counted = [r["device_syncs"] for r in prop if r.get("device_syncs") is not None]
        syncs = max(counted) if counted else "not counted (no CUDA)"
        out.append(f"- `propose` at batch <= 8, lookahead {worst['lookahead']} <= 0.15 ms wall "
                   f"(device path): {'met' if worst['device_ms'] <= 0.15 else 'NOT met'} "
                   f"(highest {worst['device_ms']:.3f} ms at batch {worst['batch']}; host path "
                   f"{worst['host_ms']:.3f} ms); host syncs per call on the device path: "
                   f"{syncs}.")
    p = st.get("project", {})
    tgt = next((s["name"] for s in p.get("sources", []) if s.get("target")), None)
    rows = next(iter(p.get("tables", {}).values()), [])  # the smaller policy
    if tgt and rows:
        small = [r[tgt] for r in rows if r["batch"] <= 8 and tgt in r]
        at64 = [r[tgt] for r in rows if r["batch"] == 64 and tgt in r]
        if small:
            out.append(f"- Projected speedup >= 2.5x at batch <= 8 "
                       f"(tau {TARGET_ACCEPTANCE_LENGTH}): "
                       f"{'met' if min(small) >= 2.5 else 'NOT met'} (lowest {min(small):.2f}x).")
        if at64:
            out.append(f"- Projected speedup >= 1.3x at batch 64: "
                       f"{'met' if at64[0] >= 1.3 else 'NOT met'} ({at64[0]:.2f}x).")
    return out + [""] if len(out) > 2 else []
