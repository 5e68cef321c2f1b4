"""The ATLAS core end to end on a tiny random Llama (real vLLM; random weights say
nothing about speed or acceptance): offline static training through the CLI, static vs
adaptive, the adaptive drafter publishing to the running proposer, the suffix index's
memory bound over a long soak."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "one two three four one two three four one two",
    "The quick brown fox jumps over the lazy dog. The quick",
]


@pytest.fixture(scope="module")
def static_dir(tiny_model_path, tmp_path_factory):
    from atlas_rl.cli import main

    out = tmp_path_factory.mktemp("static")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 3))
    rc = main(["train-speculator", "--model", tiny_model_path, "--prompts", str(prompts),
               "--out", str(out / "drafter"), "--num-prompts", "6", "--max-tokens", "24",
               "--epochs", "2", "--draft-vocab-size", "512", "--dtype", "float32",
               "--drafter", "mlp"])
    assert rc == 0
    return out / "drafter"


def _net_state(engine):
    return {k: v.clone() for k, v in engine.speculators["neural"].net.state_dict().items()}


def test_train_speculator_writes_a_loadable_drafter_and_a_report(static_dir):
    assert (static_dir / "neural.safetensors").is_file()
    report = json.loads((static_dir / "train_report.json").read_text())
    assert report["training_rows"] > 50 and len(report["history"]) == 2
    first, last = report["heldout_before"], report["history"][-1]
    for key in ("accept_distribution", "accept_one_hot", "accept_ceiling_one_hot", "vocab_coverage"):
        assert 0.0 <= last[key] <= 1.0
    assert last["loss"] is not None and last["loss"] == last["loss"]  # finite, not NaN
    meta = json.loads((static_dir / "neural.json").read_text())
    assert meta["hidden_size"] == 128 and meta["draft_vocab_size"] == 512
    assert first["accept_distribution"] >= 0.0


def test_train_speculator_distils_an_eagle3_drafter_with_its_curve(tiny_model_path, tmp_path):
    """The default drafter: rollouts through vLLM, features through transformers, unrolled
    training; the directory loads as the engine's static drafter."""
    from atlas_rl.cli import main
    from atlas_rl.speculators.eagle3 import Eagle3Speculator, is_eagle3_dir

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 3))
    out = tmp_path / "eagle3"
    assert main(["train-speculator", "--model", tiny_model_path, "--prompts", str(prompts),
                 "--out", str(out), "--num-prompts", "9", "--completions", "2",
                 "--max-tokens", "24", "--draft-vocab-size", "256", "--time-budget", "4",
                 "--dtype", "float32"]) == 0
    assert is_eagle3_dir(out)
    report = json.loads((out / "train_report.json").read_text())
    assert report["train_steps"] >= 1 and len(report["curve"]) >= 2
    final = report["heldout_final"]
    assert len(final["distribution"]) == 4 and all(0.0 <= a <= 1.0 for a in final["distribution"])
    assert 0.0 < report["draft_vocab_sampled_coverage"] <= 1.0
    spec = Eagle3Speculator.from_dir(out)
    assert spec.aux_layers == (0, 1) and spec.net.num_aux == 2  # a 2-layer policy


def test_train_speculator_rejects_bad_arguments(tiny_model_path, tmp_path, capsys):
    from atlas_rl.cli import main

    assert main(["train-speculator", "--model", tiny_model_path, "--prompts",
                 str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train-speculator", "--model", tiny_model_path, "--prompts", "x.jsonl",
                 "--out", str(tmp_path / "o"), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_static_is_frozen_and_adaptive_warm_starts_then_trains_and_publishes(
        make_engine, tiny_model_path, static_dir):
    from safetensors.torch import load_file

    saved = {k[4:]: v for k, v in load_file(str(static_dir / "neural.safetensors")).items()
             if k.startswith("net.")}
    static = make_engine(tiny_model_path, "atlas-static", dtype="float32", speculate_always=True,
                         static_speculator=str(static_dir))
    adaptive = make_engine(tiny_model_path, "atlas", dtype="float32", speculate_always=True,
                           static_speculator=str(static_dir))
    for engine in (static, adaptive):
        assert all(torch.equal(saved[k], v) for k, v in _net_state(engine).items())
    for engine in (static, adaptive):
        batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=24, seed=0)
        assert batch.stats["num_draft_tokens"] > 0
        assert batch.stats["drafts_neural"] + batch.stats["drafts_neural-dist"] > 0
        info = engine.update(batch)
        if engine is static:  # online training off: nothing learned
            assert "drafter_version" not in info and "index_tokens" not in info
            assert all(torch.equal(saved[k], v) for k, v in _net_state(engine).items())
        else:
            assert info["drafter_version"] == 1 and info["index_sequences"] == len(batch)
            assert info["drafter_train_seconds"] <= info["update_budget_seconds"] + 0.5
            assert any(not torch.equal(saved[k], v) for k, v in _net_state(engine).items())
    # The running engine keeps drafting after the publish, holding the new version
    # (that drafts come from the published weights is checked in test_neural.py).
    neural = adaptive.speculators["neural"]
    batch = adaptive.generate(PROMPTS[:1], temperature=0.0, max_tokens=4)
    assert neural.version == 1 and batch.stats["engine_steps"] > 0


def test_atlas_static_without_a_static_drafter_uses_the_suffix_index(make_engine, tiny_model_path):
    engine = make_engine(tiny_model_path, "atlas-static", dtype="float32", static_speculator="none")
    assert list(engine.speculators) == ["suffix"] and engine.speculators["suffix"].frozen
    with pytest.raises(FileNotFoundError, match="train-speculator"):
        from atlas_rl.speculators.neural import static_speculator_dir

        static_speculator_dir("/no/such/dir", tiny_model_path)


def test_soak_index_and_buffers_stay_bounded_and_throughput_holds(make_engine, tiny_model_path):
    """500 rollout steps with a small memory bound: the suffix index never exceeds it,
    the drafter's buffers stay bounded, and tokens per second do not decay."""
    bound = 3000
    engine = make_engine(tiny_model_path, "atlas", dtype="float32", speculate_always=True,
                         max_corpus_tokens=bound)
    suffix, neural = engine.speculators["suffix"], engine.speculators["neural"]
    neural.max_buffer_rows = 2000
    tps, table_sizes = [], []
    for step in range(500):
        batch = engine.generate([PROMPTS[step % 3] + f" {step}"], n=2, temperature=1.0,
                                max_tokens=12, seed=step)
        info = engine.update(batch)
        assert info["index_tokens"] <= bound
        assert neural.distiller.buffer.num_rows <= neural.distiller.buffer.max_rows + 64
        assert not neural._streams and not neural._done  # captured states consumed
        tps.append(batch.stats["tokens_per_s"])
        table_sizes.append(len(suffix._past.table))
    assert max(table_sizes) <= bound * len(suffix.ngram_sizes)
    assert len(suffix._past.seqs) < 500  # evicted, not kept
    # A decay guard (not a speed claim): late throughput within 2x of early.
    assert statistics.median(tps[-50:]) > 0.5 * statistics.median(tps[50:100])


def test_the_learning_budget_follows_where_drafting_can_pay():
    """`learning_budget`: train_budget_fraction of the rollout time times the share of
    request-steps at batch sizes where a draft could pay (each engine step of bucket b
    weighs its 2**b requests); the rule off, or nothing to judge by: the whole share."""
    from atlas_rl.config import AtlasConfig
    from atlas_rl.metrics import SpecCounters
    from atlas_rl.speculation import learning_budget

    cfg = AtlasConfig(train_budget_fraction=0.1)
    # 40 steps of 4 requests (bucket 2) and 10 steps of 64 (bucket 6)
    since = SpecCounters(request_steps=800, batch_steps=[0, 0, 40, 0, 0, 0, 10])
    small_only = lambda n: n <= 8  # noqa: E731
    budget, why = learning_budget(cfg, 20.0, since, small_only)
    assert why["learn_opportunity"] == pytest.approx(160 / 800)
    assert budget == pytest.approx(2.0 * 160 / 800)
    assert learning_budget(cfg, 20.0, since, lambda n: True)[0] == pytest.approx(2.0)
    assert learning_budget(cfg, 20.0, since, lambda n: False)[0] == 0.0
    # a drafter that has not drafted yet (no static one) learns its first batches
    assert learning_budget(cfg, 20.0, since, lambda n: False, starting=True)[0] == \
        pytest.approx(2.0)
    off = AtlasConfig(train_budget_fraction=0.1, learn_where_drafting_pays=False)
    assert learning_budget(off, 20.0, since, small_only) == (pytest.approx(2.0), {})
    assert learning_budget(cfg, 20.0, None, small_only)[0] == pytest.approx(2.0)
    assert learning_budget(cfg, 20.0, since, None)[0] == pytest.approx(2.0)


def test_a_drafter_without_a_static_start_learns_its_first_updates_whatever_was_drafted():
    """`drafter_starting`: no draft vocabulary yet, or fewer than STARTING_UPDATES
    updates of a drafter that did not start from a static one; never a static drafter.
    While starting, `learn_update` trains it though the controller drafted nothing."""
    from atlas_rl.config import AtlasConfig
    from atlas_rl.metrics import SpecCounters
    from atlas_rl.speculation import STARTING_UPDATES, drafter_starting, learn_update
    from atlas_rl.speculators import NeuralSpeculator

    g = torch.Generator().manual_seed(0)
    embed = torch.randn(300, 16, generator=g)
    neural = NeuralSpeculator(draft_vocab_size=64)
    neural.attach_target(embed, embed)
    assert neural.vocab is None and drafter_starting({"neural": neural})
    neural.set_vocab_from_counts(torch.arange(300.0))
    neural.vocab_source = "rollouts"
    neural.distiller.version = STARTING_UPDATES - 1
    assert drafter_starting({"neural": neural})
    neural.distiller.version = STARTING_UPDATES
    assert not drafter_starting({"neural": neural})
    neural.distiller.version, neural.vocab_source = 0, "static"
    assert not drafter_starting({"neural": neural})
    # starting: trains though nothing was drafted (under learn_min_drafted_fraction)
    neural.vocab_source, neural.distiller.version = "rollouts", 1
    hidden = torch.randn(40, 16, generator=g)
    neural.capture("r", hidden, torch.randint(0, 300, (40,), generator=g).tolist(), 0)
    neural.finish("r")
    idle = SpecCounters(request_steps=100, lookahead_hist=[100], batch_steps=[0, 0, 25])
    out = learn_update(AtlasConfig(), {"neural": neural}, [], 10.0, idle, lambda n: True)
    assert out["drafted_fraction"] == 0.0 and "drafter_update_waits" not in out
    assert neural.version == 2
    neural.distiller.version = STARTING_UPDATES  # started: the same update waits
    neural.capture("s", hidden, torch.randint(0, 300, (40,), generator=g).tolist(), 0)
    neural.finish("s")
    out = learn_update(AtlasConfig(), {"neural": neural}, [], 10.0, idle, lambda n: True)
    assert out["drafter_update_waits"] == 1.0 and neural.version == STARTING_UPDATES


def test_the_controller_judges_where_a_draft_could_pay():
    """A surely accepted draft token pays where its verification costs less than the
    step's throughput gives: B / base x slope < 1 (the step-cost model); an unmeasured
    size could pay; over the batch cap nothing pays."""
    from atlas_rl.controller import AtlasController

    ctl = AtlasController(max_lookahead=4, speculators=["suffix"], max_batch_size=128)
    assert ctl.drafting_could_pay(4) and ctl.drafting_could_pay(64)  # not measured yet
    for _ in range(8):
        ctl.record_step_time(4, 0, 0.025)   # 4 sequences: 25 ms a step
        ctl.record_step_time(64, 0, 0.090)  # 64 sequences: 90 ms
    for d in (4, 8, 16, 32) * 4:  # verification: 0.5 ms a draft token at 4, 2 ms at 64
        ctl.record_step_time(4, d, 0.025 + 0.001 + 0.0005 * d)
        ctl.record_step_time(64, d, 0.090 + 0.005 + 0.002 * d)
    assert ctl.drafting_could_pay(4) and not ctl.drafting_could_pay(64)
    assert not ctl.drafting_could_pay(256)  # over the cap


def test_a_zero_budget_learns_nothing_and_the_engine_reports_its_budget(make_engine,
                                                                        tiny_model_path,
                                                                        static_dir):
    """train_budget_fraction 0: the drafter takes no step (weights bit-equal, nothing
    published, what it captured waits) while the suffix index still learns. With a
    budget, the update's budget is the rule's, from the batch's own counters."""
    from atlas_rl.speculation import learning_budget

    engine = make_engine(tiny_model_path, "atlas", dtype="float32", speculate_always=True,
                         static_speculator=str(static_dir), train_budget_fraction=0.0)
    neural = engine.speculators["neural"]
    saved = _net_state(engine)
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=0)
    assert batch.stats["num_draft_tokens"] > 0
    info = engine.update(batch)
    assert info["update_budget_seconds"] == 0.0 and "drafter_version" not in info
    assert all(torch.equal(saved[k], v) for k, v in _net_state(engine).items())
    assert neural.version == 0 and neural.distiller.buffer.num_rows > 0
    assert info["index_sequences"] == len(batch)
    engine.config.train_budget_fraction = 0.1
    engine.controller.always = False  # the cost model judges (every size unmeasured: pays)
    before = engine.proposer.counters.copy()
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=1)
    since = engine.proposer.counters.copy().since(before)
    expected, why = learning_budget(engine.config, engine._last_rollout_seconds, since,
                                    engine.controller.drafting_could_pay)
    info = engine.update(batch)
    assert info["learn_opportunity"] == pytest.approx(why["learn_opportunity"])
    assert info["update_budget_seconds"] == pytest.approx(expected)
    assert info["update_budget_seconds"] <= 0.1 * engine._last_rollout_seconds + 1e-9


def test_a_drafter_that_does_not_draft_waits_to_learn(make_engine, tiny_model_path, static_dir):
    """Under `learn_min_drafted_fraction` of drafting request-steps (here: speculation
    capped off), the update trains nothing and says so, and what the drafter captured
    waits in its buffer; the suffix index still learns. Drafting again, it trains."""
    engine = make_engine(tiny_model_path, "atlas", dtype="float32", max_speculation_batch_size=0,
                         static_speculator=str(static_dir))
    neural = engine.speculators["neural"]
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=0)
    assert batch.stats["num_draft_tokens"] == 0
    info = engine.update(batch)
    assert info["drafter_update_waits"] == 1.0 and info["drafted_fraction"] == 0.0
    assert "drafter_version" not in info and neural.version == 0
    assert neural.distiller.buffer.num_rows > 0  # the captured rows wait there
    assert info["index_sequences"] == len(batch)
    engine.controller.max_batch_size, engine.controller.always = None, True  # drafting now
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=1)
    info = engine.update(batch)
    assert info["drafted_fraction"] > 0.5 and "drafter_update_waits" not in info
    assert info["drafter_version"] == 1
