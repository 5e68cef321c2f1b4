"""What eviction costs an engine step: the suffix speculator of HEAD (git) against the
working tree's, the same simulated steps in one process.

    python scripts/suffix_eviction.py [--bound 2000000] [--past 1.0] [--repeats 1]
                                      [--out suffix-eviction.json]
    python scripts/suffix_eviction.py --soak   # the small-bounds soak's shape, by window

Simulates the suffix speculator's work in a vLLM server's worker, the one place where
learning runs inside an engine step (`WorkerSpeculation.on_step`): --batch requests in
flight, each announced with its prompt (`begin_request`); every step drafts for all of
them (`propose`, lookahead 4) and each advances by its accepted draft tokens + 1
(verified against its rollout, drawn in advance; not timed: the model's part); finished
ones are reported at the next step (`finish`) and learnt once --learn-every of them wait
(the worker's ``learn_every``, 16). Rollouts: --group completions per prompt, prompts of
64-256 tokens, completions of 100-700; token ids Zipf-distributed (s = 1.1) over
SmolLM2's 49,152-token vocabulary, a third of each completion copied in spans from its
prompt and its siblings (RL rollouts repeat each other).

Default: at the speculator's default bounds (corpus 2M tokens). The corpus is first
filled to --fill x the bound (untimed, large batches); then steps are timed while
--past x the bound more tokens are learnt, so eviction runs throughout (HEAD: a rebuild
each time the corpus passes the bound; working tree: every learn, removing what it
drops). Reported per run: the speculator's time per step (no model forward), median,
p99, max; the steps that learn, with eviction and before it; the most a step spent
evicting (`_evict`), dropping finished contexts (`_drop_finished`) and in full garbage
collections. Goal: no step past twice the median because of eviction.

--soak: the small-bounds soak of `serve_throughput.py soak --set max_corpus_tokens=20000
--set max_history_tokens=10000 --set max_finished_live=64` (480 requests of n = 2 from
4 clients: 8 sequences in flight, 64 prompts cycled, 64-token completions), from an
empty server, per window of 40 requests: the speculator's seconds per step and per
generated token, learning and eviction seconds. Is its work what drifts?

Run it alone: another process on the CPU distorts the timings (the JSON keeps the load
average and this process' CPU share, wall vs CPU time).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 49_152  # SmolLM2's
ROOT = Path(__file__).resolve().parent.parent
SOAK = {"bound": 20_000, "max_history_tokens": 10_000, "max_finished_live": 64, "batch": 8,
        "group": 2, "prompts": 64, "prompt_len": (50, 150), "completion_len": (64, 64),
        "fill": 0.0, "requests": 960, "window": 80}


def head_suffix_module(ref: str = "HEAD"):
    """atlas_rl/speculators/suffix.py as committed at `ref` (HEAD), imported as its own
    module."""
    source = subprocess.run(["git", "show", f"{ref}:atlas_rl/speculators/suffix.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "suffix_head.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("suffix_head", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Rollouts:
    """Prompt + completion token lists, drawn once (the same for every implementation)."""

    def __init__(self, seed: int, group: int, prompts: int = 0, prompt_len=(64, 256),
                 completion_len=(100, 700)):
        self.rng = np.random.default_rng(seed)
        p = np.arange(1, VOCAB + 1, dtype=np.float64) ** -1.1
        self.cdf = np.cumsum(p / p.sum())
        self.perm = self.rng.permutation(VOCAB)  # rank -> token id
        self.group = group
        self.prompt_len, self.completion_len = prompt_len, completion_len
        self.system = self._zipf(40)  # a chat template's shared head
        # prompts > 0: that many prompts, cycled, each one's earlier completions copied
        # from too (a policy repeats itself); 0: a new prompt per group
        self.prompts = [self._prompt() for _ in range(prompts)]
        self.earlier: dict[int, list[list[int]]] = {}

    def _zipf(self, n: int) -> list[int]:
        ranks = np.searchsorted(self.cdf, self.rng.random(n))
        return self.perm[np.minimum(ranks, VOCAB - 1)].tolist()

    def _prompt(self) -> list[int]:
        lo, hi = self.prompt_len
        return self.system + self._zipf(max(0, int(self.rng.integers(lo, hi + 1)) - 40))

    def groups(self):
        """Lists of `group` sequences (prompt + completion) of one prompt, and its length."""
        rng, i = self.rng, 0
        while True:
            which = i % len(self.prompts) if self.prompts else None
            i += 1
            prompt = self.prompts[which] if self.prompts else self._prompt()
            sources = list(self.earlier.get(which, ()))
            out = []
            for _ in range(self.group):
                length = int(rng.integers(self.completion_len[0], self.completion_len[1] + 1))
                comp: list[int] = []
                while len(comp) < length:
                    if rng.random() < 0.33:  # a span of the prompt, a sibling, an earlier one
                        src = sources[int(rng.integers(len(sources)))] if sources and \
                            rng.random() < 0.7 else prompt
                        n = int(rng.integers(4, 25))
                        start = int(rng.integers(0, max(1, len(src) - n)))
                        comp += src[start:start + n]
                    else:
                        comp += self._zipf(int(rng.integers(5, 31)))
                comp = comp[:length]
                sources.append(comp)
                out.append(prompt + comp)
            if which is not None:
                self.earlier[which] = sources[-4:]
            yield out, len(prompt)


class Timers:
    """Seconds spent in some of the speculator's methods (eviction: `_evict`,
    `_drop_finished`; learning: `_add` (the corpus, eviction included),
    `_learn_history`; drafting: `propose`), wall and this thread's CPU (`_cpu`), and in
    full garbage collections (a full collection walks every container the index holds),
    since `reset`."""

    METHODS = ("_evict", "_drop_finished", "_add", "_learn_history", "propose")

    def __init__(self, cls):
        self.cls, self.saved = cls, {m: getattr(cls, m) for m in self.METHODS}
        for m in self.METHODS:
            setattr(cls, m, self._timed(m, self.saved[m]))
        gc.callbacks.append(self._gc)
        self._gc_start = None
        self.reset()

    def _timed(self, name, inner):
        def wrapper(spec, *a, **kw):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(spec, *a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.seconds[name + "_cpu"] += time.thread_time() - c
        return wrapper

    def _gc(self, phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.seconds["full_gc"] += time.perf_counter() - self._gc_start

    def reset(self):
        self.seconds = dict.fromkeys(
            (*self.METHODS, *(m + "_cpu" for m in self.METHODS), "full_gc"), 0.0)

    def close(self):
        gc.callbacks.remove(self._gc)
        for m, fn in self.saved.items():
            setattr(self.cls, m, fn)


def run(module, args, label: str) -> dict:
    """One implementation's timed steps (see the module docstring)."""
    cls = module.SuffixSpeculator
    spec = cls(max_corpus_tokens=args.bound, max_history_tokens=args.max_history_tokens,
               max_finished_live=args.max_finished_live)
    timers = Timers(cls)
    try:
        return _run(spec, args, label, timers)
    finally:
        timers.close()


def _run(spec, args, label, timers) -> dict:
    source = Rollouts(args.seed, args.group, args.prompts, args.prompt_len,
                      args.completion_len).groups()
    filled = 0  # untimed: the corpus filled to --fill x the bound, in batches of 1/20 of it
    while filled < args.fill * args.bound:
        batch: list[list[int]] = []
        while sum(map(len, batch)) < args.bound / 20:
            batch += next(source)[0]
        filled = int(spec.learn(batch)["index_tokens"])
    queue: list[tuple[list[int], int]] = []  # (sequence, prompt length) to start
    live: list[list] = []  # [key, tokens, context length]
    finished: list[str] = []
    completed: list[list[int]] = []
    steps, windows, next_key, done = [], [], 0, 0
    learnt, target = 0, args.past * args.bound
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    while (done < args.requests) if args.requests else (learnt < target):
        while len(queue) < args.batch:
            group, plen = next(source)
            queue += [(s, plen) for s in group]
        timers.reset()
        learn_s, learn_cpu, generated, evicted = 0.0, 0.0, 0, 0
        t0, c0 = time.perf_counter(), time.thread_time()
        # 1. the step begins: last step's finished requests, learning when due
        for key in finished:
            spec.finish(key)
        finished.clear()
        if len(completed) >= args.learn_every:
            before = len(spec._past.seqs)
            t, c = time.perf_counter(), time.thread_time()
            stats = spec.learn(completed)
            learn_s, learn_cpu = time.perf_counter() - t, time.thread_time() - c
            evicted = before + len(completed) - int(stats["index_sequences"])
            learnt += sum(len(s) for s in completed)
            completed = []
        # 2. new requests join (announced with their prompts); 5. every request drafts
        while len(live) < args.batch:
            seq, plen = queue.pop(0)
            spec.begin_request(f"r{next_key}", seq[:plen])
            live.append([f"r{next_key}", np.asarray(seq, dtype=np.int64), plen])
            next_key += 1
        drafts = spec.propose([r[0] for r in live], [r[1][:r[2]] for r in live],
                              [args.lookahead] * len(live))
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        still = []  # verification against the rollout
        for r, d in zip(live, drafts):
            tokens, n = r[1], r[2]
            accepted = 0
            for tok in d.tokens:
                if n + accepted >= len(tokens) or tokens[n + accepted] != tok:
                    break
                accepted += 1
            r[2] = min(len(tokens), n + accepted + 1)
            generated += r[2] - n
            if r[2] >= len(tokens):
                finished.append(r[0])
                completed.append(tokens.tolist())
                done += 1
            else:
                still.append(r)
        live = still
        steps.append({"s": elapsed, "cpu": cpu, "learn_s": learn_s, "learn_cpu": learn_cpu,
                      "evicted": evicted, "tokens": generated,
                      **{k: v for k, v in timers.seconds.items()}})
        if args.window and done >= (len(windows) + 1) * args.window:
            windows.append(_window(steps, windows, done))
        if args.progress and len(steps) % args.progress == 0:
            recent = statistics.median(s["s"] for s in steps[-args.progress:])
            print(f"  {label}: step {len(steps)}, learnt {learnt / args.bound:.2f} x the "
                  f"bound, median step {1e3 * recent:.1f} ms", file=sys.stderr, flush=True)
    wall = time.perf_counter() - wall0
    out = {"impl": label, "steps": len(steps), "sequences_done": done,
           "tokens_learnt": learnt, "index_tokens": spec._past.num_tokens,
           "wall_s": wall, "cpu_share": (time.process_time() - cpu0) / wall,
           "loadavg_1min_before_after": [load0, os.getloadavg()[0]],
           **summarize(steps)}
    if windows:
        out["windows"] = windows
    out["per_step"] = {k: [round(s[k], 6) for s in steps] for k in steps[0]}
    return out


def _window(steps: list[dict], windows: list[dict], done: int) -> dict:
    first = sum(w["steps"] for w in windows)
    ws = steps[first:]
    total = sum(s["s"] for s in ws)
    tokens = sum(s["tokens"] for s in ws)
    return {"sequences_done": done, "steps": len(ws),
            "median_step_ms": 1e3 * statistics.median(s["s"] for s in ws),
            "speculator_s": total, "speculator_ms_per_token": 1e3 * total / max(1, tokens),
            "tokens_per_step": tokens / len(ws),
            "learn_s": sum(s["learn_s"] for s in ws),
            "evict_s": sum(s["_evict"] for s in ws),
            "drop_finished_s": sum(s["_drop_finished"] for s in ws),
            "full_gc_s": sum(s["full_gc"] for s in ws)}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else None


def _kind(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median_ms": statistics.median(xs), "p99_ms": _pct(xs, 0.99),
            "max_ms": max(xs)}


def summarize(steps: list[dict]) -> dict:
    """Per clock (this thread's CPU time: what the speculator did, whatever else ran on
    the machine; wall time: what a step took), in milliseconds."""
    return {clock: _summarize(steps, *keys) for clock, keys in
            {"cpu": ("cpu", "_evict_cpu", "_drop_finished_cpu"),
             "wall": ("s", "_evict", "_drop_finished")}.items()}


def _summarize(steps: list[dict], step: str, evict: str, drop: str) -> dict:
    t = [1e3 * s[step] for s in steps]
    # what eviction cost a step: evicting the corpus, dropping finished requests'
    # contexts, a full garbage collection in it
    cost = [1e3 * (s[evict] + s[drop] + s["full_gc"]) for s in steps]
    med = statistics.median(t)
    learning = [i for i, s in enumerate(steps) if s["learn_s"]]
    over = [i for i in range(len(t)) if t[i] > 2 * med]
    factor = [t[i] / (t[i] - cost[i]) for i in range(len(t)) if 0 < cost[i] < t[i]]
    out = {"median_ms": med, "p99_ms": _pct(t, 0.99), "max_ms": max(t),
           "max_over_median": max(t) / med,
           "steps_without_learning": _kind([t[i] for i in range(len(t)) if not steps[i]["learn_s"]]),
           "learning_steps_without_eviction": _kind([t[i] for i in learning if not steps[i]["evicted"]]),
           "learning_steps_with_eviction": _kind([t[i] for i in learning if steps[i]["evicted"]]),
           "max_ms_in_a_step": {"evict": max(1e3 * s[evict] for s in steps),
                                "drop_finished": max(1e3 * s[drop] for s in steps),
                                "full_gc": max(1e3 * s["full_gc"] for s in steps)},
           # a step's time over its time without what eviction cost it
           "eviction_factor": {"median": statistics.median(factor) if factor else 1.0,
                               "max": max(factor, default=1.0)},
           "steps_over_2x_median": len(over),
           # over twice the median, and not without what eviction cost them
           "steps_over_2x_median_by_eviction": sum(t[i] - cost[i] <= 2 * med for i in over)}
    if out["steps_without_learning"]["n"]:
        out["steps_without_learning"]["max_over_median"] = \
            out["steps_without_learning"]["max_ms"] / med
    return out


def table(results: list[dict], clock: str) -> str:
    def f(x):
        return "-" if x is None else f"{x:.1f}"

    rows = [("impl", "steps", "median", "p99", "max", "max/med", "no-learn max/med",
             "learn: plain med", "evicting med/max", "evict max", "drop max", "full GC max",
             "evict factor max", ">2x med by evict", "cpu share")]
    for r in results:
        c = r[clock]
        plain, ev = c["learning_steps_without_eviction"], c["learning_steps_with_eviction"]
        spikes = c["max_ms_in_a_step"]
        rows.append((f"{r['impl']}#{r['repeat']}", str(r["steps"]), f(c["median_ms"]),
                     f(c["p99_ms"]), f(c["max_ms"]), f(c["max_over_median"]),
                     f(c["steps_without_learning"].get("max_over_median")),
                     f(plain.get("median_ms")),
                     f"{f(ev.get('median_ms'))}/{f(ev.get('max_ms'))}",
                     f(spikes["evict"]), f(spikes["drop_finished"]), f(spikes["full_gc"]),
                     f"{c['eviction_factor']['max']:.2f}",
                     f"{c['steps_over_2x_median_by_eviction']}/{c['steps_over_2x_median']}",
                     f"{r['cpu_share']:.2f}"))
    return _columns(rows)


def window_table(results: list[dict]) -> str:
    rows = [("impl", "requests", "steps", "median step ms", "ms/token", "learn s", "evict s",
             "drop s", "full GC s")]
    for r in results:
        for w in r.get("windows", ()):
            rows.append((f"{r['impl']}#{r['repeat']}", str(w["sequences_done"] // 2),
                         str(w["steps"]), f"{w['median_step_ms']:.2f}",
                         f"{w['speculator_ms_per_token']:.3f}", f"{w['learn_s']:.2f}",
                         f"{w['evict_s']:.2f}", f"{w['drop_finished_s']:.2f}",
                         f"{w['full_gc_s']:.2f}"))
    return _columns(rows)


def _columns(rows) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--soak", action="store_true",
                    help="the small-bounds soak's shape (see above); its settings: " +
                         ", ".join(f"{k}={v}" for k, v in SOAK.items()))
    ap.add_argument("--bound", type=int, default=2_000_000,
                    help="max_corpus_tokens (default: the speculator's, 2M)")
    ap.add_argument("--max-history-tokens", type=int, default=1_000_000)
    ap.add_argument("--max-finished-live", type=int, default=1024)
    ap.add_argument("--fill", type=float, default=0.9,
                    help="untimed: fill the corpus to this fraction of the bound first")
    ap.add_argument("--past", type=float, default=1.0,
                    help="timed steps learn this many times the bound (eviction throughout)")
    ap.add_argument("--requests", type=int, default=0,
                    help="instead: timed steps until this many sequences finished")
    ap.add_argument("--window", type=int, default=0, help="report per this many sequences")
    ap.add_argument("--batch", type=int, default=64, help="sequences in flight")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--prompts", type=int, default=0, help="prompts cycled (0: new ones)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 256))
    ap.add_argument("--completion-len", type=int, nargs=2, default=(100, 700))
    ap.add_argument("--learn-every", type=int, default=16)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    ap.add_argument("--impl", choices=("both", "head", "working"), default="both")
    ap.add_argument("--base", default="HEAD",
                    help="the git commit 'head' is taken from (38375d5~1: the last whole-"
                         "corpus rebuild)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", type=int, default=0, help="a line every this many steps")
    ap.add_argument("--out", default="suffix-eviction.json")
    args = ap.parse_args()
    if args.soak:
        for k, v in SOAK.items():
            setattr(args, k, v)
    sys.path.insert(0, str(ROOT))
    from atlas_rl.machine import machine_info
    from atlas_rl.speculators import suffix as working

    impls = {"head": lambda: head_suffix_module(args.base), "working": lambda: working}
    names = list(impls) if args.impl == "both" else [args.impl]
    machine = machine_info("-")
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores); load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    results = []
    for rep in range(args.repeats):
        for name in names:
            r = run(impls[name](), args, name)
            r["repeat"] = rep
            results.append(r)
            print(table([r], "cpu").splitlines()[1], flush=True)
    for clock, what in (("cpu", "this thread's CPU time"), ("wall", "wall time")):
        print(f"\nThe speculator's work per engine step, ms of {what}:")
        print(table(results, clock))
    if args.window:
        print()
        print(window_table(results))
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine,
                                          "results": results}, indent=1))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
