"""atlas-rl as a vLLM plugin: stock vLLM speculates with atlas from a speculative config
alone (`vllm.LLM` in-process and with multiprocessing, `vllm serve`), the proposer learns
where it lives, its state survives a restart, and bad configs are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atlas_rl.backends.vllm import plugin
from tests.test_serve import Server

# --- the config: checked and moved where every worker reads it ------------------------


def _engine_args(spec, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model="m", speculative_config=spec, **kw)


def test_an_atlas_server_on_a_cpu_gets_the_cpu_weight_transfer(tmp_path):
    """NCCL cannot run on a CPU: an atlas config asking for it (what `trl vllm-serve`
    passes) gets atlas_files with a transfer directory; a config without atlas, or an
    explicit atlas_files one with its own directory, is left as it was."""
    from vllm.config.weight_transfer import WeightTransferConfig

    from atlas_rl.backends.vllm import weight_transfer as wt

    args = _engine_args(plugin.speculative_config(),
                        weight_transfer_config=WeightTransferConfig(backend="nccl"))
    assert plugin.configure_weight_transfer(args, plugin.move_atlas_fields(args)) == wt.BACKEND
    assert args.weight_transfer_config.backend == wt.BACKEND
    directory = Path(args.additional_config[wt.CONFIG_KEY]["directory"])
    assert directory.is_dir() and oct(directory.stat().st_mode)[-3:] == "700"
    directory.rmdir()
    plain = _engine_args(None, weight_transfer_config=WeightTransferConfig(backend="nccl"))
    assert plugin.configure_weight_transfer(plain, plugin.move_atlas_fields(plain)) == "nccl"
    assert plain.weight_transfer_config.backend == "nccl" and not plain.additional_config
    mine = _engine_args(None, weight_transfer_config={"backend": wt.BACKEND},
                        additional_config={wt.CONFIG_KEY: {"directory": str(tmp_path)}})
    assert plugin.configure_weight_transfer(mine, False) == wt.BACKEND
    assert mine.additional_config[wt.CONFIG_KEY]["directory"] == str(tmp_path)
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    assert wt.BACKEND in WeightTransferEngineFactory._registry  # the plugin registered it


def test_the_file_transfer_refuses_paths_outside_its_directory(tmp_path):
    from atlas_rl.backends.vllm import weight_transfer as wt

    for name in ("../etc/passwd", "/etc/passwd", "a/b", ".hidden", "", None):
        with pytest.raises(wt.WeightUpdateRefused, match="bare file name"):
            wt._safe_file(tmp_path, name, "update_info.file")
    files = list(wt.write_chunks(tmp_path, [("a", __import__("torch").ones(4, 4)),
                                            ("b", __import__("torch").zeros(8))], chunk_bytes=40))
    assert [info["names"] for _, info in files] == [["a"], ["b"]]  # cut at ~40 bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, _ in files)  # renamed


def test_atlas_fields_move_to_additional_config():
    spec = plugin.speculative_config(state_dir="/tmp/state", learn_every=4, explore=0.1,
                                     max_lookahead=4)
    args = _engine_args(json.loads(json.dumps(spec)), additional_config={"other": 1})
    assert plugin.move_atlas_fields(args)
    assert args.speculative_config == {"method": "custom_class", "model": plugin.PROPOSER_CLASS,
                                       "num_speculative_tokens": 4}
    fields = args.additional_config["atlas_rl"]
    assert args.additional_config["other"] == 1
    assert fields["state_dir"] == "/tmp/state" and fields["learn_every"] == 4
    assert fields["config"]["explore"] == 0.1 and fields["speculation"] == "atlas"
    assert args.worker_extension_cls == "atlas_rl.backends.vllm.remote.AtlasWorkerExtension"
    # a config without atlas fields is left alone, as is no config
    plain = {"method": "ngram", "num_speculative_tokens": 4}
    for spec in (plain, None):
        args = _engine_args(spec)
        assert not plugin.move_atlas_fields(args) and args.speculative_config == spec


@pytest.mark.parametrize("atlas, match", [
    ({"max_lookahed": 4}, r"unknown field\(s\) 'max_lookahed'; valid fields: max_lookahead"),
    ({"max_lookahead": "4"}, r"field 'max_lookahead' must be int, got str '4'"),
    ({"speculation": "fast"}, r"'speculation' must be 'atlas' or 'atlas-static'"),
    ({"learn_every": 0}, r"'learn_every' must be an integer >= 1"),
    ({"learn_when_idle": "yes"}, r"'learn_when_idle' must be true or false, got 'yes'"),
    ({"max_lookahead": 0}, r"max_lookahead must be >= 1"),
    ([1, 2], r"expected a JSON object"),
])
def test_bad_atlas_fields_are_refused_naming_the_field(atlas, match):
    args = _engine_args({"method": "custom_class", "model": plugin.PROPOSER_CLASS,
                         "num_speculative_tokens": 8, "atlas": atlas})
    with pytest.raises(ValueError, match=match):
        plugin.move_atlas_fields(args)


def test_atlas_fields_with_another_proposer_are_refused():
    args = _engine_args({"method": "ngram", "num_speculative_tokens": 8, "atlas": {}})
    with pytest.raises(ValueError, match="must use method 'custom_class'"):
        plugin.move_atlas_fields(args)


def test_speculative_config_cli_prints_what_vllm_takes():
    from atlas_rl.cli import main

    out = subprocess.run([sys.executable, "-m", "atlas_rl.cli", "speculative-config",
                          "--state-dir", "/data/atlas", "--set", "explore=0.2"],
                         capture_output=True, text=True, check=True).stdout
    spec = json.loads(out)
    assert spec["atlas"] == {"explore": 0.2, "speculation": "atlas", "state_dir": "/data/atlas"}
    assert main(["speculative-config", "--set", "explor=0.2"]) == 2


def test_plugin_is_an_installed_vllm_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("atlas_rl") == "atlas_rl.backends.vllm.plugin:register"


# --- stock vLLM, real model ---------------------------------------------------------------

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           ("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\n"
            "Answer: Let's think step by step.")]


@pytest.fixture(scope="module")
def keep_alive():
    """In-process engines share vLLM's process-wide parallel state, and destroying one
    tears it down under the others: the stock engines live until the module ends."""
    engines = []
    yield engines
    engines.clear()


def _stock_llm(model, monkeypatch, multiprocessing: bool, **spec_kwargs):
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocessing else "0")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    plugin.register()  # what vLLM's entry point does in every process
    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
               kv_cache_memory_bytes=1 << 29,  # 0.5 GiB, as the suite's other engines
               speculative_config=plugin.speculative_config(**spec_kwargs))


@pytest.mark.slow
def test_stock_vllm_llm_speculates_with_atlas_learns_and_saves(real_model_path, monkeypatch,
                                                               tmp_path, keep_alive):
    """`vllm.LLM(speculative_config=atlas_rl.speculative_config(...))`, nothing else: the
    proposer sets itself up in the worker, greedy output equals no speculation, drafts
    are verified, the completed requests are learnt when the next wave starts, and the
    state directory gets the learnt state."""
    from vllm import SamplingParams

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.backends.vllm.engine import proposer

    baseline = AtlasRolloutEngine(real_model_path, "none", AtlasConfig(
        dtype="float32", cpu_kv_cache_gib=0.5, max_model_len=1024))
    want = baseline.generate(PROMPTS, temperature=0.0, max_tokens=24)
    baseline.close()  # before the stock engine is built: they share vLLM's process state
    del baseline
    state = tmp_path / "state"
    llm = _stock_llm(real_model_path, monkeypatch, False, state_dir=str(state), learn_every=64,
                     speculate_always=True, learn_when_idle=False)  # learning in the steps
    keep_alive.append(llm)
    atlas = proposer(llm)
    assert atlas is not None and atlas.worker is not None and atlas.controller is not None
    assert atlas.worker.idle is None
    got = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    assert [list(o.outputs[0].token_ids) for o in got] == [c.completion_ids for c in want]
    assert atlas.counters.num_drafts > 0
    llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=32, n=4, seed=1))
    assert atlas.worker.learns == 0  # 10 completed < learn_every, the engine never ran dry
    time.sleep(1.2)  # the engine ran dry: the next wave's first step learns
    llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=8))
    assert atlas.worker.learns == 1
    # the server learns by the engine's rule (`speculation.learn_update`): it drafted on
    # every request-step here, so its drafter trained instead of waiting
    assert atlas.worker.last_update["drafted_fraction"] > 0.5
    assert "drafter_update_waits" not in atlas.worker.last_update
    assert atlas.worker.last_update["drafter_version"] >= 1
    saved = json.loads((state / "atlas_config.json").read_text())
    assert saved["model"] == real_model_path and saved["speculation"] == "atlas"
    assert saved["speculators"] == list(atlas.speculators)


@pytest.mark.slow
def test_a_stock_vllm_worker_learns_while_idle_and_its_next_step_stops_the_learner(
        real_model_path, monkeypatch, keep_alive):
    """The default for a server (`worker.IdleLearner`): completed sequences wait for a
    gap instead of being learnt in a step; once the engine has been idle for
    IDLE_LEARN_SECONDS, a thread learns them all in one full update; the next engine
    step stops a learner that is still learning, waits for it, and generates as before."""
    from vllm import SamplingParams

    from atlas_rl.backends.vllm import hooks
    from atlas_rl.backends.vllm.engine import proposer
    from atlas_rl.backends.vllm.worker import DEFER_UPDATES, IDLE_LEARN_SECONDS

    llm = _stock_llm(real_model_path, monkeypatch, False, learn_every=4, speculate_always=True)
    keep_alive.append(llm)
    atlas = proposer(llm)
    work, idle = atlas.worker, atlas.worker.idle
    assert idle is not None and hooks.status()["idle_learning"] == "applied"
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    want = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, greedy)]
    sampled = SamplingParams(temperature=1.0, max_tokens=24, n=4, seed=1)
    llm.generate(PROMPTS, sampled)
    llm.generate(PROMPTS, sampled)  # its steps see 8+ completed >= learn_every: deferred
    assert work.learns == 0 and 4 * DEFER_UPDATES > 18
    # twice learn_every and more wait (the earlier calls' sequences, reported finished in
    # the next call's steps; the last call's where vLLM flushed their report, which
    # in-process it does at the next call), and no step learnt them
    assert idle.waiting() >= 2 * 4
    deadline = time.monotonic() + 60
    while work.learns == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert work.learns == 1 and idle.updates == 1 and idle.stopped == 0
    assert work.last_update["idle_update"] == 1.0
    assert work.last_update["drafter_version"] >= 1 and work.last_update["drafter_rows"] > 0
    assert idle.waiting() == 0 and not atlas.completed
    assert idle.seconds > 0 and work.update_seconds > 0

    # a learner still learning when a step begins is stopped, and the step waits for it
    started, seen = threading.Event(), []

    def long_update(budget=None, stop=None, resume=False):
        started.set()
        while not stop.is_set():
            time.sleep(0.005)
        seen.append(time.monotonic())
        return {"idle_update": 1.0}

    work.learn = long_update
    try:
        llm.generate(PROMPTS, sampled)
        assert started.wait(IDLE_LEARN_SECONDS + 10)
        got = llm.generate(PROMPTS, greedy)
    finally:
        del work.learn  # the class's again
    assert seen and idle.stopped == 1  # stopped by the step; generation went on, exact
    assert [list(o.outputs[0].token_ids) for o in got] == want

    # an idle update that raises is counted, and serving goes on
    def failing_update(budget=None, stop=None, resume=False):
        raise RuntimeError("drafter update failed")

    errors = work.update_errors
    work.learn = failing_update
    try:
        llm.generate(PROMPTS, sampled)
        deadline = time.monotonic() + 30
        while work.update_errors == errors and time.monotonic() < deadline:
            time.sleep(0.05)
        got = llm.generate(PROMPTS, greedy)
    finally:
        del work.learn
    assert work.update_errors == errors + 1
    assert [list(o.outputs[0].token_ids) for o in got] == want
    deadline = time.monotonic() + 60  # its last update done before the next test runs
    while (idle.pending() or idle.learning) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_rollout_engine_in_multiprocess_mode_reaches_the_proposer_through_collective_rpc(
        real_model_path, subprocess_env):
    """`AtlasRolloutEngine(..., multiprocess=True)`: vLLM's engine core (and the proposer)
    in its own process, set up there by the plugin; batch stats, learning, save and load
    go through `collective_rpc` (`backends.vllm.remote`), with the same API as in-process;
    so do weight syncs (`remote.RemoteWeightSync`), checked and all or nothing.
    (In a fresh process: vLLM freezes its environment once an in-process engine ran.)"""
    from pathlib import Path

    probe = Path(__file__).parent / "probes" / "multiprocess_engine_probe.py"
    proc = subprocess.run([sys.executable, str(probe), real_model_path], capture_output=True,
                          text=True, env=subprocess_env(), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["speculation"] == "atlas" and seen["completions"] == 8
    assert seen["num_draft_tokens"] > 0
    # the proposer's own bookkeeping, read over RPC, agrees with vLLM's scheduler
    assert seen["proposer_num_draft_tokens"] == seen["num_draft_tokens"]
    assert seen["update_seconds"] > 0 and seen["learns"] == 1
    assert seen["digest_changed_after_learning"] and seen["digest_restored"]
    # sync_weights through the worker (atlas_files + collective_rpc): it lands, the drafter
    # follows, and refusals keep the weights, with the in-process engine's messages
    assert seen["sync_changed_greedy"] and seen["sync_matches_transformers"]
    assert seen["weight_syncs"] == 1 and seen["drafter_reads_policy"] is True
    assert "sync_weights refused 1 of" in seen["shape_error"]
    assert "(10, 576)" in seen["shape_error"] and "(1536, 576)" in seen["shape_error"]
    assert "5 of" in seen["nonfinite_error"] and "allow_nonfinite_weights" in seen["nonfinite_error"]
    assert "gather failed midway" in seen["iterator_error"]
    assert seen["shape_kept_weights"] and seen["nonfinite_kept_weights"]
    assert seen["iterator_kept_weights"]
    assert seen["sync_after_refusals_lands"] and seen["weight_syncs_at_end"] == 2


# --- `vllm serve` with atlas through the plugin ---------------------------------------------


class _Server(Server):
    """`vllm serve` (through `atlas-rl vllm serve`, stock vLLM's CLI) in a child process on
    127.0.0.1, with `spec` as its speculative config; stopped on exit."""

    what = "vllm serve"

    def __init__(self, model, port, spec, env, log_path, timeout=300.0):
        super().__init__(model, port, log_path.parent, env=env, key=None, name=log_path.stem)
        self.cmd = [sys.executable, "-m", "atlas_rl.cli", "vllm", "serve", model,
                    "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                    "--enforce-eager", "--max-model-len", "1024", "--seed", "0"]
        if spec is not None:
            self.cmd += ["--speculative-config", json.dumps(spec)]
        self.timeout = timeout

    def __enter__(self):
        return self.start(self.timeout)

    def post(self, path, body, timeout=300):
        status, answer = self.request(path, body, timeout=timeout)
        assert status == 200, (path, status, answer)
        return answer


def _vllm_metric(samples, name):
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


@pytest.mark.slow
def test_vllm_serve_speculates_with_atlas_exports_metrics_and_resumes_its_state(
        real_model_path, subprocess_env, free_port, tmp_path):
    """Stock `vllm serve` with `--speculative-config "$(atlas-rl speculative-config ...)"`:
    greedy completions equal no speculation, sampled ones (n > 1) complete and are the
    policy's distribution (PIT/KS, logprobs against transformers), /metrics has
    atlas_ counters equal to vLLM's own spec-decode counters, the server learns and saves
    its state, and a restarted server resumes that state (same published version)."""
    from types import SimpleNamespace

    import torch

    from atlas_rl.backends.vllm.server_metrics import read_metrics
    from atlas_rl.exactness import load_reference_model, sampling_check, sampling_values

    state = tmp_path / "state"
    spec = plugin.speculative_config(state_dir=str(state), learn_every=4)
    env = subprocess_env(VLLM_CPU_KVCACHE_SPACE=1)
    greedy_request = {"model": real_model_path, "prompt": PROMPTS, "max_tokens": 24,
                      "temperature": 0.0, "return_token_ids": True}

    def greedy_tokens(server):
        choices = server.post("/v1/completions", greedy_request)["choices"]
        return [c["token_ids"] for c in sorted(choices, key=lambda c: c["index"])]

    with _Server(real_model_path, free_port, None, env, tmp_path / "plain.log") as server:
        want = greedy_tokens(server)  # the same vLLM server without speculation
    with _Server(real_model_path, free_port, spec, env, tmp_path / "serve.log") as server:
        assert greedy_tokens(server) == want
        completions = []
        # vLLM seeds the n children of a request seed + 0 .. n - 1: seeds n apart or more,
        # or calls would repeat each other's completions (same prompt, same seed) and the
        # KS test would count them twice (a spurious p < 1e-3, seen once with 1, 2, 3)
        for seed in (100, 200, 300):
            sampled = server.post("/v1/completions", {
                "model": real_model_path, "prompt": PROMPTS, "max_tokens": 32, "n": 4,
                "temperature": 1.0, "seed": seed, "logprobs": 1, "return_token_ids": True})
            assert len(sampled["choices"]) == 8
            assert all(c["finish_reason"] in ("length", "stop") for c in sampled["choices"])
            completions += [SimpleNamespace(prompt_ids=c["prompt_token_ids"],
                                            completion_ids=c["token_ids"],
                                            logprobs=c["logprobs"]["token_logprobs"])
                            for c in sampled["choices"]]
        # lossless through the server: the sampled tokens are distributed as the policy
        # (PIT values uniform, KS) and their logprobs are the policy's
        ref = load_reference_model(real_model_path)
        check = sampling_check(*sampling_values(ref, completions, 1.0,
                                                torch.Generator().manual_seed(0)))
        del ref
        assert check.num_tokens > 500 and check.passed(alpha=1e-3, logprob_tol=1e-3), check
        time.sleep(1.5)  # let the next wave's first step learn the ones before
        server.post("/v1/completions", {"model": real_model_path, "prompt": PROMPTS[:1],
                                        "max_tokens": 4, "temperature": 0.0})
        time.sleep(1.0)  # the snapshot is written at most every 0.5 s
        samples = server.metrics()
        drafted = _vllm_metric(samples, "vllm:spec_decode_num_draft_tokens_total")
        accepted = _vllm_metric(samples, "vllm:spec_decode_num_accepted_tokens_total")
        assert drafted > 0
        assert samples["atlas_draft_tokens_total"] == drafted
        assert samples["atlas_accepted_tokens_total"] == accepted
        assert samples["atlas_updates_total"] >= 1 and samples["atlas_restored"] == 0.0
        # speculation on/off by batch size: every step counted, drafting ones among them
        steps = {k.split("{")[1]: v for k, v in samples.items()
                 if k.startswith("atlas_engine_steps_by_batch_total{")}
        drafting = {k.split("{")[1]: v for k, v in samples.items()
                    if k.startswith("atlas_drafting_steps_by_batch_total{")}
        assert sum(steps.values()) > 0 and sum(drafting.values()) > 0
        assert all(drafting[b] <= steps[b] for b in steps)
        saved_fingerprint = samples["atlas_state_fingerprint"]  # of the last saved state
        reader = read_metrics(server.base)
        assert reader["num_draft_tokens"] == drafted and reader["acceptance_length"] > 1.0
        assert "acceptance_rate_pos_0" in reader
    saved = json.loads((state / "atlas_config.json").read_text())
    assert saved["model"] == real_model_path
    with _Server(real_model_path, free_port, spec, env, tmp_path / "serve2.log") as server:
        # read before any request: a request's sequence is learnt in the idle time after it
        # (a new version, a new state), so the state restored is the one to compare
        deadline = time.monotonic() + 30
        while (samples := server.metrics()).get("atlas_restored") != 1.0 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert samples["atlas_restored"] == 1.0
        assert samples["atlas_published_version"] == saved["published_version"]
        # the very speculators it saved (drafter weights, suffix index, history): the
        # same drafts on any probe
        assert samples["atlas_state_fingerprint"] == saved_fingerprint
    assert "speculators restored from" in (tmp_path / "serve2.log").read_text()
    # a state directory from another model: the server refuses to start, and says why
    saved["model"] = "/elsewhere/qwen2.5-0.5b-instruct"
    (state / "atlas_config.json").write_text(json.dumps(saved))
    with pytest.raises(AssertionError, match="vllm serve exited") as refused:
        with _Server(real_model_path, free_port, spec, env, tmp_path / "serve3.log"):
            pass
    assert "vllm serve exited (1)" in str(refused.value)
    assert ("was saved for model '/elsewhere/qwen2.5-0.5b-instruct'"
            in (tmp_path / "serve3.log").read_text())


# --- state that survives; metrics exposition (no server) ------------------------------------


def test_a_save_that_dies_midway_leaves_the_previous_state_loadable(tmp_path, monkeypatch):
    from atlas_rl import AtlasConfig
    from atlas_rl import speculation as room
    from atlas_rl.speculators import SuffixSpeculator

    spec = SuffixSpeculator((2, 3), seed=0)
    spec.learn([[1, 2, 3, 4, 5, 6]])
    directory = tmp_path / "state"
    room.save_state(directory, "atlas", AtlasConfig(), {"suffix": spec}, None)
    first = (directory / "suffix.safetensors").read_bytes()
    spec.learn([[7, 8, 9, 10, 11, 12]])

    def dies(self, where):
        (where / "suffix.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(SuffixSpeculator, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        room.save_state(directory, "atlas", AtlasConfig(), {"suffix": spec}, None)
    monkeypatch.undo()
    assert (directory / "suffix.safetensors").read_bytes() == first
    again = SuffixSpeculator((2, 3), seed=0)
    room.load_state(directory, {"suffix": again}, None)
    assert again.propose(["k"], [[1, 2, 3]], [3])[0].tokens == [4, 5, 6]


def test_a_state_from_another_model_is_refused_with_the_reason(tmp_path):
    from atlas_rl.backends.vllm.worker import check_state_for_model

    with pytest.raises(ValueError, match="saved for model '/m/qwen2.5-0.5b'.*not '/m/smollm2"):
        check_state_for_model({"model": "/m/qwen2.5-0.5b"}, "/m/smollm2-135m-instruct", tmp_path)
    check_state_for_model({"model": "/other/place/smollm2-135m-instruct"},
                          "/m/smollm2-135m-instruct", tmp_path)  # same model, moved: fine


def test_metrics_snapshot_is_exposed_under_atlas_names(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from atlas_rl.backends.vllm.server_metrics import AtlasCollector, parse_exposition

    path = tmp_path / "m.json"
    registry = CollectorRegistry()
    registry.register(AtlasCollector(str(path)))
    assert parse_exposition(generate_latest(registry).decode()) == {}  # nothing written yet
    path.write_text(json.dumps({"drafts": 10, "draft_tokens": 30, "accepted_tokens": 12,
                                "acceptance_length": 2.2, "published_version": 3,
                                "draft_tokens_per_position": [10, 10, 10],
                                "accepted_tokens_per_position": [6, 4, 2], "lookahead": [0, 0, 0, 10],
                                "engine_steps_by_batch": [5, 0, 7], "drafting_steps_by_batch": [5, 0, 1]}))
    samples = parse_exposition(generate_latest(registry).decode())
    assert samples["atlas_draft_tokens_total"] == 30 and samples["atlas_accepted_tokens_total"] == 12
    assert samples["atlas_acceptance_length"] == 2.2 and samples["atlas_published_version"] == 3
    assert samples['atlas_accepted_tokens_per_position_total{position="1"}'] == 4
    assert samples['atlas_lookahead_total{lookahead="3"}'] == 10
    assert samples['atlas_engine_steps_by_batch_total{batch="4"}'] == 7
    assert samples['atlas_drafting_steps_by_batch_total{batch="4"}'] == 1


def test_outside_the_supported_vllm_range_the_plugin_says_so_and_installs_nothing(
        monkeypatch, caplog):
    from atlas_rl.backends.vllm import hooks

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(hooks, "tested_version", lambda: False)
    installed = []
    monkeypatch.setattr(plugin, "_install_config_hook", installed.append)
    monkeypatch.setattr(plugin, "_install_worker_hook", installed.append)
    with caplog.at_level("WARNING", logger="atlas_rl.backends.vllm.plugin"):
        plugin.register()
        plugin.register()  # once
    assert installed == []
    said = [r.getMessage() for r in caplog.records if "outside the versions" in r.getMessage()]
    assert len(said) == 1 and "leaves this vLLM untouched" in said[0]


def test_a_corrupted_state_directory_is_refused(tmp_path):
    from atlas_rl import AtlasConfig
    from atlas_rl import speculation as room
    from atlas_rl.speculators import SuffixSpeculator

    spec = SuffixSpeculator((2, 3), seed=0)
    spec.learn([[1, 2, 3, 4, 5, 6]])
    room.save_state(tmp_path, "atlas", AtlasConfig(), {"suffix": spec}, None)
    (tmp_path / "suffix.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(room.StateError, match="corrupted: speculator 'suffix' does not load"):
        room.load_state(tmp_path, {"suffix": SuffixSpeculator((2, 3), seed=0)}, None)
    (tmp_path / "atlas_config.json").write_text("{not json")
    with pytest.raises(room.StateError, match="is corrupted .atlas_config.json"):
        room.read_state(tmp_path)


def test_atlas_fields_are_checked_after_hfargumentparser_rewrote_the_config_fields():
    """TRL's and transformers' argument parsers resolve AtlasConfig's field types in place;
    the check must not depend on whether one ran first (it failed in CI that way)."""
    from transformers import HfArgumentParser

    from atlas_rl import AtlasConfig

    HfArgumentParser(AtlasConfig)
    config = AtlasConfig.from_dict({"explore": 0.1, "speculate_always": True,
                                    "max_speculation_batch_size": None, "ngram_sizes": [2, 3]})
    assert config.explore == 0.1 and config.ngram_sizes == (2, 3)
    with pytest.raises(ValueError, match="'max_speculation_batch_size' must be int | None"):
        AtlasConfig.from_dict({"max_speculation_batch_size": "16"})


def test_saving_into_a_directory_with_files_of_its_own_keeps_them(tmp_path):
    from atlas_rl import AtlasConfig
    from atlas_rl import speculation as room
    from atlas_rl.speculators import SuffixSpeculator

    spec = SuffixSpeculator((2, 3), seed=0)
    spec.learn([[1, 2, 3, 4, 5, 6]])
    (tmp_path / "notes.txt").write_text("mine")
    room.save_state(tmp_path, "atlas", AtlasConfig(), {"suffix": spec}, None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    again = SuffixSpeculator((2, 3), seed=0)
    room.load_state(tmp_path, {"suffix": again}, None)
    assert again.propose(["k"], [[1, 2, 3]], [3])[0].tokens == [4, 5, 6]
    assert not [p for p in tmp_path.parent.iterdir() if ".saving-" in p.name]
