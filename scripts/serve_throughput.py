"""`vllm serve` with atlas against `vllm serve` without speculation, same prompts, rounds
interleaved (issue 18), and AtlasRolloutEngine in-process against multiprocess.

    python scripts/serve_throughput.py serve  [--rounds 6] [--clients 4] [--out FILE]
    python scripts/serve_throughput.py engine [--rounds 4] [--out FILE]

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
    port = _free_port()
    cmd = [sys.executable, "-m", "atlas_rl.cli", "vllm", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len",
           "2048", "--seed", "0"]
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
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
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("serve", "engine"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from atlas_rl.machine import machine_info

    result = (serve if args.part == "serve" else engine)(args)
    result["machine"] = machine_info("float32")
    result["args"] = vars(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
