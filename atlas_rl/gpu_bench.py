"""The GPU check's measurements (`scripts/gpu_check.sh`; docs/gpu.md says what they mean).

One stage per process (``python -m atlas_rl.gpu_bench --stage NAME --out DIR``), so that a
CUDA fault in one stage cannot take the others with it; each stage merges its results
into ``DIR/gpu-check.json`` and rewrites ``DIR/gpu-check.md`` from the whole file, so a
run that is cut short still leaves everything measured until then.

- ``env``: the machine, and the HBM bandwidth of a device-to-device copy (the limit).
- ``verify``: verification (`kernels.rejection.rejection_sample`), Triton (launched one by
  one, and replayed as a CUDA graph where the logits fit) vs the torch reference, batch x
  lookahead x vocabulary x draft-q kind; time per step, achieved bandwidth against
  reading the logits once, and whether all gave the same tokens.
- ``drafter``: `NeuralSpeculator.propose` per step (and the device time of one draft
  position) at batch 1-256, its drafting loop launched op by op and replayed as a CUDA
  graph, host syncs per call, an online training step in bf16.
- ``proposer``: `AtlasProposer.propose` per engine step driven as vLLM's runner drives it
  (`backends.vllm.harness`), the host path against the device path, host syncs per call.
- ``step``: the policy's step cost, a transformers forward with a static KV cache of
  Qwen2.5-0.5B- and 1.5B-shaped models (random weights from a config: no download) at
  batch 1-256 and 1-9 tokens per sequence, eager and replayed as a CUDA graph.
- ``compile``: the same forward through torch.compile where the time budget allows.
- ``project``: projected rollout speedup per batch size (a projection, not a rollout;
  `atlas_rl.gpu_report`, which also renders the markdown).

``--cpu-smoke`` runs every stage at toy sizes on the CPU (kernels under
``TRITON_INTERPRET=1``), so CI keeps this file working without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from atlas_rl.gpu_report import CPU_BENCH, project, render_markdown
from atlas_rl.kernels.rejection import rejection_sample
from atlas_rl.kernels.testing import compare_backends, verification_case

JSON_NAME, MD_NAME = "gpu-check.json", "gpu-check.md"

# Published HBM bandwidth by device name (first match wins), for the report only: the
# limit the verification is measured against is the copy bandwidth measured in `env`.
NOMINAL_HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
                           ("H100", 3.35e12), ("H800", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
                           ("A100", 1.56e12))

# Public shapes of the Qwen2.5 models (config.json of Qwen/Qwen2.5-0.5B and -1.5B).
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
}
QWEN_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                   rms_norm_eps=1e-6, tie_word_embeddings=True)

FULL = dict(
    verify_batches=(1, 8, 64, 256), lookaheads=(1, 2, 4, 8), vocabs=(49152, 151936),
    q_kinds=("one-hot", "sparse"), support=4096, chunk=None,
    draft_batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), draft_lookaheads=(1, 3, 4),
    proposer_batches=(1, 2, 4, 8, 16, 64), proposer_lookahead=3,
    draft_vocab=4096, train_rows=4096,
    models={k: {**QWEN_COMMON, **v} for k, v in QWEN_SHAPES.items()},
    step_batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), step_tokens=tuple(range(1, 10)),
    context=1024, compile_shapes=((1, 1), (1, 4), (8, 1), (8, 4), (64, 1), (64, 4)),
)
SMOKE = dict(
    verify_batches=(3,), lookaheads=(1, 2), vocabs=(500,), q_kinds=("one-hot", "sparse"),
    support=16, chunk=128,
    draft_batches=(1, 4), draft_lookaheads=(1, 2), draft_vocab=64, train_rows=64,
    proposer_batches=(1, 3), proposer_lookahead=2,
    models={"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                         tie_word_embeddings=True)},
    step_batches=(1, 2), step_tokens=(1, 2, 3), context=32, compile_shapes=(),
)


# --- timing ---------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: repetitions per timing; --cpu-smoke times each thing once (it checks the code path)
TIMING = {"warmup": 2, "min_reps": 3}


def time_call(fn, device, *, budget_s=0.2, max_reps=50, back_to_back=True) -> dict:
    """Seconds per call of ``fn(rep)``: ``wall_s`` the median of calls each waited for
    (what one step costs when nothing else is queued) and, with ``back_to_back``,
    ``device_s`` the mean of calls issued back to back (the host runs ahead: GPU time by
    CUDA events)."""
    for _ in range(TIMING["warmup"]):
        fn(0)
    _sync(device)
    t0 = time.perf_counter()
    fn(1)
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(TIMING["min_reps"], budget_s / 2 / one)))
    walls = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r)
        _sync(device)
        walls.append(time.perf_counter() - t0)
    if device.type == "cuda" and back_to_back:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for r in range(reps):
            fn(r)
        end.record()
        end.synchronize()
        device_s = start.elapsed_time(end) / 1e3 / reps
    else:
        device_s = statistics.median(walls)
    return {"device_s": device_s, "wall_s": statistics.median(walls), "reps": reps}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# --- stages -----------------------------------------------------------------------------

def stage_env(cfg, device, deadline) -> dict:
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "device": str(device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}",
                    l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1))
        nominal = next((bw for name, bw in NOMINAL_HBM_BYTES_PER_S if name in props.name), None)
        info["nominal_hbm_gb_s"] = nominal / 1e9 if nominal else None
        nbytes = 1 << 30
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_call(lambda r: dst.copy_(src), device, budget_s=0.5)
    if device.type != "cuda":
        t["device_s"] = t["wall_s"]
    # a copy reads and writes every byte: bandwidth = 2 * bytes / time
    info["copy_bandwidth_gb_s"] = 2 * nbytes / t["device_s"] / 1e9
    return info


def _no_save(partial: dict) -> None:
    pass


def stage_verify(cfg, device, deadline, peak_bytes_per_s, save=_no_save) -> dict:
    rows = []
    for vocab in cfg["vocabs"]:
        for kind in cfg["q_kinds"]:
            for batch in cfg["verify_batches"]:
                for k in cfg["lookaheads"]:
                    if deadline.left() < 5:
                        return {"rows": rows, "cut_short": True}
                    rows.append(_verify_one(cfg, device, vocab, kind, batch, k, peak_bytes_per_s))
                    save({"rows": rows})
                    r = rows[-1]
                    print(f"  verify V={vocab} {kind} {batch}x{k}: triton "
                          f"{r['triton_us']:.1f} us, graph {r['graph_us'] or 0:.1f} us, torch "
                          f"{r['torch_us']:.1f} us, identical={r['identical']}/"
                          f"{r['graph_identical']}", flush=True)
    return {"rows": rows, "cut_short": False}


def _verify_one(cfg, device, vocab, kind, batch, k, peak_bytes_per_s) -> dict:
    from atlas_rl.kernels.rejection_triton import (
        graph_fits,
        rejection_sample_triton,
        rejection_sample_triton_graphed,
    )

    case = verification_case(kind, [k] * batch, vocab, support=cfg["support"], device=device,
                             seed=batch * 31 + k)
    logit_bytes = case["target_logits"].numel() * case["target_logits"].element_size()
    # Each timed call reads a different logits buffer (together > 256 MB, ~5x an H100's
    # L2), so the cache cannot serve a small batch's logits from the previous call.
    copies = 1 if device.type == "cpu" else max(1, min(256, (256 << 20) // logit_bytes + 1))
    buffers = [case["target_logits"]] + [case["target_logits"].clone() for _ in range(copies - 1)]
    base = {k2: v for k2, v in case.items() if k2 != "target_logits"}

    def triton_call(r):
        return rejection_sample_triton(**base, target_logits=buffers[r % copies],
                                       chunk=cfg["chunk"])

    def torch_call(r):
        return rejection_sample(**base, target_logits=buffers[r % copies], backend="torch")

    def graph_call(r):
        return rejection_sample_triton_graphed(**base, target_logits=buffers[r % copies],
                                               chunk=cfg["chunk"])

    tri = time_call(triton_call, device)
    ref = time_call(torch_call, device, max_reps=20)
    fits = graph_fits(case["target_logits"], k, batch)
    graph = time_call(graph_call, device) if fits else None
    # the same tokens, on the timed inputs (and the graph's the eager launches')
    check = compare_backends(case, chunk=cfg["chunk"], graphed=fits)
    limit_s = logit_bytes / peak_bytes_per_s
    best_s = min(tri["device_s"], graph["device_s"]) if graph else tri["device_s"]
    return {"vocab": vocab, "q": kind, "batch": batch, "lookahead": k,
            "triton_us": tri["device_s"] * 1e6, "triton_wall_us": tri["wall_s"] * 1e6,
            "graph_us": graph["device_s"] * 1e6 if graph else None,
            "graph_wall_us": graph["wall_s"] * 1e6 if graph else None,
            "graph_identical": check["graph_equal"], "best_us": best_s * 1e6,
            "best_fraction_of_limit": limit_s / best_s,
            "torch_us": ref["device_s"] * 1e6, "torch_wall_us": ref["wall_s"] * 1e6,
            "speedup_vs_torch": ref["device_s"] / tri["device_s"],
            "logits_mb": logit_bytes / 1e6, "read_once_limit_us": limit_s * 1e6,
            "achieved_gb_s": logit_bytes / tri["device_s"] / 1e9,
            "fraction_of_limit": limit_s / tri["device_s"],
            "identical": check["equal"] and check["logprob_within_tolerance"],
            "accepted": check["accepted"], "recovered": check["recovered"]}


def stage_drafter(cfg, device, deadline, save=_no_save) -> dict:
    from atlas_rl.speculators import NeuralSpeculator
    from atlas_rl.speculators.drafter_net import DrafterNet

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"dtype": str(dtype), "models": {}}
    for name, shape in cfg["models"].items():
        d, vocab = shape["hidden_size"], shape["vocab_size"]
        gen = torch.Generator(device).manual_seed(0)
        embed = (torch.randn(vocab, d, generator=gen, device=device) * d ** -0.5).to(dtype)
        spec = NeuralSpeculator(draft_vocab_size=cfg["draft_vocab"], frozen=True)
        spec.attach_target(embed, embed)
        if spec.vocab is None:  # a vocabulary as the rollouts would choose one
            spec.set_vocab_from_counts(torch.rand(vocab, generator=torch.Generator().manual_seed(0)))
        rows = []
        result["models"][name] = {"hidden_size": d, "rows": rows}
        for batch in cfg["draft_batches"]:
            if deadline.left() < 10:
                result["cut_short"] = True
                break
            keys = [f"r{i}" for i in range(batch)]
            spec.begin_batch()
            hidden = torch.randn(batch, d, generator=gen, device=device)
            for i, key in enumerate(keys):
                spec.capture(key, hidden[i:i + 1], [i % vocab], 0)
            row = {"batch": batch}
            for k in cfg["draft_lookaheads"]:
                # before: the drafting loop's launches one by one; after: a CUDA graph
                for graphs, label in ((False, "propose"), (True, "propose_graph")):
                    spec.graphs = graphs
                    t = time_call(lambda r, k=k, keys=keys, spec=spec: spec.propose(
                        keys, [[0]] * len(keys), [k] * len(keys)), device, budget_s=0.1)
                    row[f"{label}_k{k}_ms"] = t["wall_s"] * 1e3
                spec.graphs = None
            # the device work of one draft position, without the Python around it
            head_t = spec._head_sub_t
            ddt = head_t.dtype  # the drafting dtype (bf16 on a CPU with bf16 units too)
            weights = spec.net.inference_weights(ddt)
            h, tok = hidden.to(ddt), torch.zeros(batch, dtype=torch.long, device=device)

            def one_position(r, weights=weights, h=h, tok=tok, head_t=head_t, embed=embed):
                e = embed.index_select(0, tok).to(ddt)
                y = DrafterNet.draft_step(weights, h, e, 1e-5)
                return torch.softmax(spec.head_logits(y).float(), -1).argmax(-1)

            t = time_call(one_position, device, budget_s=0.1)
            row["draft_position_device_ms"] = t["device_s"] * 1e3
            rows.append(row)
            save(result)
            print(f"  drafter {name} batch {batch}: propose k=1 {row['propose_k1_ms']:.3f} ms, "
                  f"graphed {row['propose_graph_k1_ms']:.3f} ms", flush=True)
        result["models"][name] = {"hidden_size": d, "rows": rows,
                                  "host_syncs_per_propose": _count_syncs(spec, device),
                                  "training": _train_step(spec, device, d, cfg)}
    return result


def stage_proposer(cfg, device, deadline, save=_no_save) -> dict:
    """`AtlasProposer.propose` per engine step as vLLM's runner calls it, without vLLM
    (`backends.vllm.harness`; random hidden states, so acceptance means nothing here),
    the neural drafter at lookahead ``proposer_lookahead``: before, the host path (the
    step's hidden states copied to the host, drafting launched op by op, drafts read back,
    lists handed over) and after, the device path (hidden states stay on the device, the
    drafting loop one CUDA graph, a device tensor handed over, read back by the next
    step). Wall time of the call with its device work waited for, host syncs per call."""
    from atlas_rl.backends.vllm.harness import ProposerHarness
    from atlas_rl.speculators import NeuralSpeculator

    name, shape = next(iter(cfg["models"].items()))
    d, vocab, k = shape["hidden_size"], shape["vocab_size"], cfg["proposer_lookahead"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    embed = (torch.randn(vocab, d, generator=gen, device=device) * d ** -0.5).to(dtype)
    counts = torch.rand(vocab, generator=torch.Generator().manual_seed(0))
    rows = []
    result = {"model": name, "hidden_size": d, "vocab": vocab, "lookahead": k,
              "dtype": str(dtype), "rows": rows}
    for batch in cfg["proposer_batches"]:
        if deadline.left() < 8:
            result["cut_short"] = True
            break
        row = {"batch": batch, "lookahead": k}
        for label, device_drafts, graphs in (("host", False, False), ("device", True, True)):
            spec = NeuralSpeculator(draft_vocab_size=cfg["draft_vocab"], frozen=True)
            spec.attach_target(embed, embed)
            spec.set_vocab_from_counts(counts)
            spec.graphs = graphs
            h = ProposerHarness(spec, batch, k, d, vocab, device=device,
                                device_drafts=device_drafts)
            for _ in range(TIMING["warmup"] + 1):  # the first drafting step captures
                h.step()
            times, t_end = [], time.monotonic() + (0.3 if device.type == "cuda" else 0.05)
            while len(times) < max(TIMING["min_reps"], 5) or time.monotonic() < t_end:
                times.append(h.step())
                if len(times) >= 200:
                    break
            caught: list[str] = []
            h.step(around=lambda caught=caught: _sync_warnings(caught, device))
            row[f"{label}_ms"] = statistics.median(times) * 1e3
            row[f"{label}_syncs"] = len(caught) if device.type == "cuda" else None
            row[f"{label}_sync_calls"] = caught[:4]
            row[f"{label}_handed"] = type(h.handed).__name__
            row[f"{label}_errors"] = h.proposer.counters.speculator_errors
        rows.append(row)
        save(result)
        print(f"  proposer batch {batch} k={k}: host path {row['host_ms']:.3f} ms "
              f"({row['host_syncs']} syncs), device path {row['device_ms']:.3f} ms "
              f"({row['device_syncs']} syncs)", flush=True)
    return result


@contextmanager
def _sync_warnings(caught: list, device):
    """Collect the synchronising CUDA calls made inside (torch's sync debug mode)."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught.extend(str(w.message).splitlines()[0][:200] for w in seen
                  if "called a synchronizing" in str(w.message))


def _count_syncs(spec, device) -> list[str] | None:
    """The synchronising CUDA calls one `propose` makes (torch's sync debug mode)."""
    if device.type != "cuda":
        return None
    keys = list(spec._last)[:4]
    torch.cuda.synchronize()
    caught: list[str] = []
    with _sync_warnings(caught, device):
        spec.propose(keys, [[0]] * len(keys), [3] * len(keys), sample=[True] * len(keys))
    return caught


def _train_step(spec, device, d, cfg) -> dict:
    """One online training pass on synthetic rows (bf16 autocast on CUDA): seconds per
    minibatch, and whether the published weights moved and stayed float32."""
    gen = torch.Generator(device).manual_seed(1)
    n = cfg["train_rows"]
    spec.frozen = False
    spec.distiller.buffer.clear()
    spec.distiller.buffer.add(torch.randn(n, d, generator=gen, device=device),
                      torch.randint(0, spec.vocab.numel(), (n,), generator=gen, device=device),
                      torch.randn(n, d, generator=gen, device=device))
    before = {k: v.detach().clone() for k, v in spec.net.state_dict().items()}
    _sync(device)
    t0 = time.perf_counter()
    stats = spec.train(max_epochs=1)
    _sync(device)
    seconds = time.perf_counter() - t0
    minibatches = max(1, math.ceil(stats.get("drafter_rows", 0) / spec.distiller.batch_rows))
    spec.frozen = True
    return {"rows": int(stats.get("drafter_rows", 0)), "seconds": seconds,
            "ms_per_minibatch": seconds / minibatches * 1e3, "loss": stats.get("drafter_loss"),
            "weights_moved": any(not torch.equal(before[k], v)
                                 for k, v in spec.net.state_dict().items()),
            "param_dtype": str(next(spec.net.parameters()).dtype),
            "param_device": str(next(spec.net.parameters()).device)}


def build_policy(shape: dict, device, dtype):
    """A Qwen2 model of the given shape with random weights (no hub, no network)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of 1.5B
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval(), config


def _static_cache(config, max_len: int):
    import inspect

    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    if "max_batch_size" in params:  # transformers 4.x
        raise RuntimeError("transformers 4.x StaticCache: this check targets transformers 5")
    return StaticCache(config=config, max_cache_len=max_len)


def _reset_cache(cache, length: int) -> None:
    """Rewind a static cache to ``length`` filled positions, in place (transformers 5
    keeps the fill level as a device tensor), so every timed step writes the same slots."""
    for layer in getattr(cache, "layers", ()):
        filled = getattr(layer, "cumulative_length", None)
        if isinstance(filled, torch.Tensor):
            filled.fill_(length)


def stage_step(cfg, device, deadline, compile_shapes=None, save=_no_save) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"dtype": str(dtype), "context": cfg["context"], "models": {}}
    context = cfg["context"]
    models = list(cfg["models"].items())
    for mi, (name, shape) in enumerate(models):
        model_deadline = Deadline(deadline.left() / (len(models) - mi))
        try:
            model, config = build_policy(shape, device, dtype)
        except Exception as e:  # noqa: BLE001 (e.g. out of memory: the next model still runs)
            result["models"][name] = {"error": f"{type(e).__name__}: {e}"[:300], "rows": [],
                                      "params_m": 0.0}
            continue
        forward = model if compile_shapes is None else torch.compile(model, dynamic=False)
        table = []
        result["models"][name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                                  "vocab_size": shape["vocab_size"], "rows": table}
        batches = cfg["step_batches"] if compile_shapes is None else \
            sorted({b for b, _ in compile_shapes})
        for batch in batches:
            tokens = cfg["step_tokens"] if compile_shapes is None else \
                [n for b, n in compile_shapes if b == batch]
            cache = _static_cache(config, context + max(tokens) + 1)
            for n in tokens:
                if model_deadline.left() < 3:
                    break
                row = {"batch": batch, "tokens": n}
                try:
                    row.update(_time_forward(forward, cache, batch, n, context, device,
                                             graph=device.type == "cuda"))
                except Exception as e:  # noqa: BLE001 (e.g. out of memory: keep the others)
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                table.append(row)
            print(f"  step {name} batch {batch}: " + ", ".join(
                f"{r['tokens']}t {r.get('best_ms', float('nan')):.2f} ms"
                for r in table if r["batch"] == batch), flush=True)
            save(result)
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def _time_forward(model, cache, batch, n, context, device, graph: bool) -> dict:
    gen = torch.Generator(device).manual_seed(batch * 10 + n)
    ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=gen, device=device)
    pos = torch.arange(context, context + n, device=device)
    kwargs = dict(input_ids=ids, past_key_values=cache, position_ids=pos[None].expand(batch, -1),
                  cache_position=pos, use_cache=True)

    def step(r=0):
        _reset_cache(cache, context)
        return model(**kwargs).logits

    out = {"eager_ms": time_call(step, device, budget_s=0.15, max_reps=10,
                                 back_to_back=False)["wall_s"] * 1e3}
    out["best_ms"] = out["eager_ms"]
    if graph:
        # A CUDA graph per shape removes the per-kernel launch cost, as vLLM's decode
        # graphs do; the cache rewind is inside the graph.
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            out["graph_ms"] = time_call(lambda r: g.replay(), device, budget_s=0.15,
                                        back_to_back=False)["wall_s"] * 1e3
            out["best_ms"] = min(out["eager_ms"], out["graph_ms"])
            del g
        except Exception as e:  # noqa: BLE001 (the eager time stands)
            out["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def stage_compile(cfg, device, deadline, save=_no_save) -> dict:
    """torch.compile of the 0.5B forward on a few shapes, as far as the budget goes
    (the first compile alone can take a minute)."""
    if device.type != "cuda" or not cfg["compile_shapes"]:
        return {"skipped": "CUDA only"}
    name = next(iter(cfg["models"]))
    sub = dict(cfg, models={name: cfg["models"][name]})
    return stage_step(sub, device, deadline, compile_shapes=cfg["compile_shapes"], save=save)


# --- report -----------------------------------------------------------------------------

def _load(out_dir: Path) -> dict:
    path = out_dir / JSON_NAME
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {"stages": {}, "errors": {}}


def _save(out_dir: Path, report: dict) -> None:
    (out_dir / JSON_NAME).write_text(json.dumps(report, indent=1, default=str))
    (out_dir / MD_NAME).write_text(render_markdown(report))


# --- entry point ------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True,
                    choices=["env", "verify", "drafter", "proposer", "step", "compile", "project",
                             "report"])
    ap.add_argument("--out", required=True, help="folder for gpu-check.json / gpu-check.md")
    ap.add_argument("--budget-s", type=float, default=120, help="soft time budget of the stage")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU")
    ap.add_argument("--bench-json", default=str(CPU_BENCH),
                    help="CPU benchmark results with the acceptance lengths to project with")
    ap.add_argument("--tests-summary", default=None, help="(report) one line on the gpu tests")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _load(out_dir)
    report.setdefault("stages", {})
    report.setdefault("errors", {})
    report["cpu_smoke"] = bool(args.cpu_smoke)
    if args.tests_summary is not None:
        report["tests"] = args.tests_summary
    cfg = SMOKE if args.cpu_smoke else FULL
    if args.cpu_smoke:
        TIMING.update(warmup=0, min_reps=1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    deadline = Deadline(args.budget_s)
    t0 = time.perf_counter()

    def save(partial: dict) -> None:
        """What a stage measured so far, on disk: a stage killed at its time limit keeps it."""
        report["stages"][args.stage] = {**partial, "partial": True}
        _save(out_dir, report)

    print(f"[gpu-check] stage {args.stage} on {device} (budget {args.budget_s:.0f} s)", flush=True)
    code = 0
    try:
        if args.stage == "env":
            result = stage_env(cfg, device, deadline)
        elif args.stage == "verify":
            peak = report["stages"].get("env", {}).get("copy_bandwidth_gb_s")
            if not peak:  # the env stage failed: measure the limit here
                peak = stage_env(cfg, device, deadline)["copy_bandwidth_gb_s"]
            result = stage_verify(cfg, device, deadline, peak * 1e9, save)
        elif args.stage == "drafter":
            result = stage_drafter(cfg, device, deadline, save)
        elif args.stage == "proposer":
            result = stage_proposer(cfg, device, deadline, save)
        elif args.stage == "step":
            result = stage_step(cfg, device, deadline, save=save)
        elif args.stage == "compile":
            result = stage_compile(cfg, device, deadline, save)
        elif args.stage == "project":
            result = project(report, Path(args.bench_json))
        else:
            result = None
        if result is not None:
            result["seconds"] = time.perf_counter() - t0
            report["stages"][args.stage] = result
            report["errors"].pop(args.stage, None)
    except Exception:  # noqa: BLE001 (recorded; the other stages still run)
        report["errors"][args.stage] = traceback.format_exc()
        print(report["errors"][args.stage], file=sys.stderr, flush=True)
        code = 1
    _save(out_dir, report)
    print(f"[gpu-check] stage {args.stage} {'done' if not code else 'FAILED'} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
