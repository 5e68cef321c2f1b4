"""`vllm serve` with atlas against `vllm serve` without speculation, same prompts, rounds
interleaved (issue 18), AtlasRolloutEngine in-process against multiprocess, and the
rollout server (`atlas-rl serve`, issue 19) under load and over a soak.

    python scripts/serve_throughput.py serve  [--rounds 6] [--clients 4] [--out FILE]
    python scripts/serve_throughput.py engine [--rounds 4] [--out FILE]
    python scripts/serve_throughput.py load   [--rounds 3] [--clients 8] [--requests 6]
                                              [--methods none,atlas-static,atlas]
    python scripts/serve_throughput.py soak   [--requests 320] [--clients 4]

load: `atlas-rl serve --speculation none` and `--speculation atlas` (--methods: also
atlas-static), all up, one sent requests at a time, the order rotated by round; each
round = --clients threads x --requests requests (one prompt, n completions, temperature
1, --max-tokens); after an atlas server's round the next starts only once that server
has finished learning in its idle time (`idle_wait_s`), so no round shares the CPU with
another server's update; per round: errors, incomplete completions, throughput, p50/p99
request latency; medians over rounds, and each method's median ratio to none.
soak: one server (--speculation, default atlas), --requests requests from --clients threads, in windows of 40:
each window's throughput and the server's resident memory (the process tree's RSS).

serve: both servers run on 127.0.0.1 (started by this script through `atlas-rl vllm
serve`, the model's bundled static drafter, atlas learning online), only one is sent
requests at a time; each round sends every prompt (n completions, temperature 1) from a
bounded pool of client threads to one server, then the same to the other (the order
alternates by round). Throughput = completion tokens / wall seconds of the round;
reported: medians over rounds and the median of per-round ratios.
engine: the same batch through AtlasRolloutEngine in-process and multiprocess=True
(built first: vLLM freezes its environment after an in-process engine), alternating.
Run it alone: two processes on 2 cores distort each other.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(base, body, timeout=600):
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


def _start(model, spec, log):
    """`atlas-rl vllm serve` (stock vLLM's server through the plugin) with `spec`."""
    port = _free_port()
    cmd = [sys.executable, "-m", "atlas_rl.cli", "vllm", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len",
           "2048", "--seed", "0"]
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    return _launch(cmd, port, log)


def _launch(cmd, port, log):
    """Start a server command on `port`; (process, base URL) once /health answers."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(1.0)
    proc.kill()
    raise SystemExit(f"server did not start; see {log.name}")


def _stop(servers) -> None:
    servers = list(servers)
    for proc, _ in servers:
        proc.terminate()
    for proc, _ in servers:
        proc.wait(timeout=60)


def _round(base, model, prompts, n, max_tokens, clients, seed):
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_post, base, {"model": model, "prompt": p, "n": n,
                                             "max_tokens": max_tokens, "temperature": 1.0,
                                             "seed": seed * 1000 + i})
                   for i, p in enumerate(prompts)]
        responses = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in responses)
    return tokens / seconds, tokens, seconds


def serve(args) -> dict:
    from atlas_rl import workloads
    from atlas_rl.backends.vllm.plugin import speculative_config
    from atlas_rl.models import resolve_model

    model = resolve_model(args.model)
    prompts = [p.prompt for p in workloads.mixed_prompts(args.prompts, seed=0)]
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    except Exception:  # noqa: BLE001
        pass
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             if tok is not None and not isinstance(p, str) else p for p in prompts]
    logs = {m: open(os.path.join(tempfile.gettempdir(), f"serve-{m}.log"), "w")
            for m in ("none", "atlas")}
    servers = {"none": _start(model, None, logs["none"]),
               "atlas": _start(model, speculative_config(), logs["atlas"])}
    rows = []
    try:
        for m, (_, base) in servers.items():  # warm-up
            _round(base, model, texts[:2], 1, 16, args.clients, 999)
        for r in range(args.rounds):
            order = ("none", "atlas") if r % 2 == 0 else ("atlas", "none")
            row = {"round": r}
            for m in order:
                tps, tokens, seconds = _round(servers[m][1], model, texts, args.n,
                                              args.max_tokens, args.clients, r)
                row[m] = {"tokens_per_s": tps, "tokens": tokens, "seconds": seconds}
            row["ratio"] = row["atlas"]["tokens_per_s"] / row["none"]["tokens_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        from atlas_rl.backends.vllm.server_metrics import read_metrics

        metrics = read_metrics(servers["atlas"][1])
    finally:
        _stop(servers.values())
    return {"part": "serve", "rows": rows,
            "median_tokens_per_s": {m: statistics.median(r[m]["tokens_per_s"] for r in rows)
                                    for m in ("none", "atlas")},
            "median_ratio": statistics.median(r["ratio"] for r in rows),
            "atlas_metrics": metrics}


def engine(args) -> dict:
    from atlas_rl import AtlasConfig, AtlasRolloutEngine, workloads

    cfg = AtlasConfig(dtype="float32", cpu_kv_cache_gib=1)
    prompts = [p.prompt for p in workloads.mixed_prompts(args.prompts, seed=0)]
    engines = {"multiprocess": AtlasRolloutEngine(args.model, "atlas", cfg, multiprocess=True),
               "in_process": AtlasRolloutEngine(args.model, "atlas", cfg)}
    rows = []
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        row = {"round": r}
        for m in order:
            batch = engines[m].generate(prompts, n=args.n, temperature=1.0,
                                        max_tokens=args.max_tokens, seed=r)
            update = engines[m].update(batch)
            row[m] = {"tokens_per_s": batch.stats["tokens_per_s"],
                      "acceptance_length": batch.stats["acceptance_length"],
                      "update_seconds": update.get("update_seconds", 0.0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    engines["multiprocess"].close()
    return {"part": "engine", "rows": rows,
            "median_tokens_per_s": {m: statistics.median(r[m]["tokens_per_s"] for r in rows)
                                    for m in engines},
            "median_ratio_multiprocess": statistics.median(
                r["multiprocess"]["tokens_per_s"] / r["in_process"]["tokens_per_s"] for r in rows)}


def _start_serve(model, speculation, log, sets=()):
    """`atlas-rl serve` (the rollout server) with `speculation` and AtlasConfig `sets`."""
    port = _free_port()
    cmd = [sys.executable, "-m", "atlas_rl.cli", "serve", model, "--port", str(port),
           "--speculation", speculation, "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "2048", "--seed", "0"]
    for item in sets if speculation != "none" else ():
        cmd += ["--set", item]
    return _launch(cmd, port, log)


def _timed_requests(base, model, prompts, clients, n, max_tokens, seed):
    """Every prompt once from a pool of `clients` threads: (latencies, errors, incomplete,
    completion tokens, wall seconds)."""
    def one(i, prompt):
        start = time.perf_counter()
        try:
            answer = _post(base, {"model": model, "prompt": prompt, "n": n,
                                  "max_tokens": max_tokens, "temperature": 1.0,
                                  "seed": seed * 100000 + i})
        except Exception as e:  # noqa: BLE001 (counted, reported)
            return None, repr(e)[:200]
        return time.perf_counter() - start, answer

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda a: one(*a), enumerate(prompts)))
    wall = time.perf_counter() - start
    latencies = [lat for lat, _ in results if lat is not None]
    errors = [a for lat, a in results if lat is None]
    answers = [a for lat, a in results if lat is not None]
    incomplete = sum(1 for a in answers for c in a["choices"]
                     if c["finish_reason"] not in ("length", "stop") or len(a["choices"]) != n)
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return latencies, errors, incomplete, tokens, wall


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def _texts(model, count, seed=0):
    from atlas_rl import workloads

    prompts = [p.prompt for p in workloads.mixed_prompts(count, seed=seed)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            if not isinstance(p, str) else p for p in prompts]


def load(args) -> dict:
    from atlas_rl.models import resolve_model

    model = resolve_model(args.model)
    texts = _texts(model, args.clients * args.requests)
    methods = _load_methods(args.methods)
    logs = {m: open(os.path.join(tempfile.gettempdir(), f"serve-load-{m}.log"), "w")
            for m in methods}
    servers = {m: _start_serve(model, m, logs[m], args.set) for m in methods}
    rows = []
    try:
        for m, (_, base) in servers.items():  # warm-up
            _timed_requests(base, model, texts[:2], 2, 1, 16, 999)
        for r in range(args.rounds):
            k = r % len(methods)  # rotated: each method goes first as often
            order = methods[k:] + methods[:k]
            row = {"round": r}
            for m in order:
                lat, errors, incomplete, tokens, wall = _timed_requests(
                    servers[m][1], model, texts, args.clients, args.n, args.max_tokens, r)
                row[m] = {"requests": len(texts), "errors": len(errors),
                          "error_samples": errors[:3], "incomplete": incomplete,
                          "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
                          "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99)}
                if m != "none":
                    row[m]["idle_wait_s"] = _wait_quiet(servers[m][1])
            rows.append(row)
            print(json.dumps(row), flush=True)
        from atlas_rl.backends.vllm.server_metrics import read_metrics

        metrics = {m: read_metrics(servers[m][1]) for m in methods if m != "none"}
    finally:
        _stop(servers.values())
    summary = {m: {k: statistics.median(r[m][k] for r in rows)
                   for k in ("tokens_per_s", "p50_s", "p99_s")} for m in methods}
    for m in summary:
        summary[m]["errors"] = sum(r[m]["errors"] for r in rows)
        summary[m]["incomplete"] = sum(r[m]["incomplete"] for r in rows)
    ratios = {m: statistics.median(r[m]["tokens_per_s"] / r["none"]["tokens_per_s"]
                                   for r in rows) for m in methods if m != "none"}
    return {"part": "load", "rows": rows, "summary": summary,
            "median_ratio": ratios.get("atlas"), "median_ratios": ratios,
            "atlas_metrics": metrics.get("atlas"), "server_metrics": metrics}


def _load_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("none", "atlas", "atlas-static")]
    if bad or "none" not in methods or len(set(methods)) != len(methods):
        raise SystemExit(f"--methods {text!r}: a comma-separated list of distinct "
                         "none, atlas, atlas-static, with none in it (the baseline)")
    return methods


def _wait_quiet(base, timeout: float = 120.0) -> float:
    """Seconds until the server is quiet: no online update running or waiting (an idle
    server learns; the next round, on whichever server, starts when it is done, so no
    server's round shares the CPU with another's learning)."""
    from atlas_rl.backends.vllm.server_metrics import read_metrics

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        m = read_metrics(base)
        if not m.get("learning_now", 0) and not m.get("learning_waiting", 0):
            break
        time.sleep(0.2)
    return time.perf_counter() - start


def _tree_rss(pid) -> int:
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def soak(args) -> dict:
    from atlas_rl.models import resolve_model

    model = resolve_model(args.model)
    texts = _texts(model, 64, seed=1)
    log = open(os.path.join(tempfile.gettempdir(), f"serve-soak-{args.speculation}.log"), "w")
    proc, base = _start_serve(model, args.speculation, log, args.set)
    windows, window = [], 40
    try:
        _timed_requests(base, model, texts[:2], 2, 1, 16, 999)  # warm-up
        from atlas_rl.backends.vllm.server_metrics import batch_stats, read_metrics

        done = 0
        before = read_metrics(base)
        while done < args.requests:
            batch = [texts[(done + i) % len(texts)] for i in range(min(window, args.requests - done))]
            lat, errors, incomplete, tokens, wall = _timed_requests(
                base, model, batch, args.clients, args.n, args.max_tokens, done)
            done += len(batch)
            row = {"requests_done": done, "errors": len(errors), "incomplete": incomplete,
                   "tokens_per_s": tokens / wall, "p50_s": _pct(lat, 0.5),
                   "p99_s": _pct(lat, 0.99), "server_rss_mib": _tree_rss(proc.pid) / 2**20}
            after = read_metrics(base)
            if after:  # the window's speculation: drafts, acceptance, time spent learning
                stats = batch_stats(before, after, wall, tokens)
                row.update({k: stats[k] for k in ("acceptance_length", "lookahead",
                                                  "server_update_seconds")})
                row["drafts"] = after["num_drafts"] - before["num_drafts"]
            before = after
            windows.append(row)
            print(json.dumps(row), flush=True)
        from atlas_rl.backends.vllm.server_metrics import read_metrics

        metrics = read_metrics(base)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rss = [w["server_rss_mib"] for w in windows]
    tps = [w["tokens_per_s"] for w in windows]
    return {"part": "soak", "speculation": args.speculation, "sets": list(args.set),
            "windows": windows,
            "requests": args.requests,
            "errors": sum(w["errors"] for w in windows),
            "incomplete": sum(w["incomplete"] for w in windows),
            "rss_mib_first_last_max": [rss[0], rss[-1], max(rss)],
            "tokens_per_s_first_half_second_half": [
                statistics.median(tps[: len(tps) // 2]), statistics.median(tps[len(tps) // 2:])],
            "atlas_metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("serve", "engine", "load", "soak"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="soak, load: an AtlasConfig field for the atlas servers (repeatable), "
                         "e.g. small memory bounds to see them reached")
    ap.add_argument("--speculation", default="atlas", choices=("atlas", "atlas-static", "none"),
                    help="soak: the server's speculation")
    ap.add_argument("--methods", default="none,atlas",
                    help="load: the servers' speculation, comma-separated, none among them")
    ap.add_argument("--requests", type=int, default=None,
                    help="load: requests per client (default 6); soak: in all (default 320)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from atlas_rl.machine import machine_info

    if args.requests is None:
        args.requests = 6 if args.part == "load" else 320
    if args.part in ("load", "soak") and args.n == 4 and args.max_tokens == 128:
        args.n, args.max_tokens = 2, 64  # the defaults of these parts
    result = {"serve": serve, "engine": engine, "load": load, "soak": soak}[args.part](args)
    result["machine"] = machine_info("float32")
    result["args"] = vars(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
