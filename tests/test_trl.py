"""The TRL drop-in: stock GRPOTrainer (+ two lines) and AtlasRLOOTrainer, on the tiny
model, real TRL 1.16 and real vLLM in colocate mode on the CPU."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("trl")

PROMPTS = ["one two three four one two three", "def add(a, b):\n    return",
           "The quick brown fox jumps over", "import os\nimport sys\nimport"]


def _length_reward(completions, **kwargs):
    return [len(c) / 100.0 for c in completions]


def _args(config_cls, tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", use_cpu=True,
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                  max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-3,
                  bf16=False, save_strategy="no", seed=0)
    kwargs.update(overrides)
    return config_cls(**kwargs)


class _CorpusProbe:
    """Records the speculator's learned-token count at the end of every step."""

    def __init__(self):
        from transformers import TrainerCallback

        probe = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                engine = probe.trainer.vllm_generation.atlas_engine
                probe.counts.append(engine.speculator._past.num_tokens)

        self.counts: list[int] = []
        self.trainer = None
        self.callback = Callback()


def _train(trainer_factory, probe):
    trainer = trainer_factory()
    probe.trainer = trainer
    trainer.add_callback(probe.callback)
    import torch

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = any(not torch.equal(before[n], p.detach())
                  for n, p in trainer.model.named_parameters())
    return trainer, changed


def _assert_drop_in_contract(trainer, changed, probe):
    import torch

    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 2
    for row in logs:
        for key in ("atlas/acceptance_length", "atlas/acceptance_rate", "atlas/lookahead",
                    "atlas/tokens_per_s", "atlas/update_seconds"):
            assert key in row, (key, sorted(row))
        assert row["atlas/acceptance_length"] >= 1.0
        assert row["atlas/tokens_per_s"] > 0
        # the adaptive drafter trained on the step's rollouts, within its budget; its
        # candidate is published or, having lost the publish gate, counted as a rollback
        assert math.isfinite(row["atlas/drafter_loss"])
        assert row.get("atlas/drafter_published", 1.0) in (0.0, 1.0)
        assert 0 <= row["atlas/drafter_rollbacks"] <= 2
        # GRPO recomputes the sampled tokens' logprobs with the policy: vLLM's match, so
        # the weight sync reached every weight (the tied LM head included)
        diff = row.get("sampling/sampling_logp_difference/max")
        if diff is not None:
            assert math.isfinite(diff) and diff < 1e-3, row
    assert changed, "the trainer did not change the policy"
    # without wandb, the speculation plot and rows land in output_dir
    from pathlib import Path

    out = Path(trainer.args.output_dir)
    assert (out / "atlas_speculation.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "atlas_speculation.jsonl").read_text().splitlines()) == 2
    # the speculator learned each step's rollouts
    assert len(probe.counts) == 2 and 0 < probe.counts[0] < probe.counts[1]

    # after a sync, vLLM's logprobs and greedy output are the trained policy's. The sampler
    # computes in the trainer's dtype (float32, TRL's default), on CPUs with bf16 units too,
    # so the bounds are float32's: logprobs agree to the order of float32 operations.
    from atlas_rl.exactness import check_sampling

    vg = trainer.vllm_generation
    vg.sync_weights()
    engine = vg.atlas_engine
    assert engine.llm.llm_engine.model_config.dtype == torch.float32 == trainer.model.dtype
    sampled = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=12, seed=1)
    check = check_sampling(trainer.model.eval(), sampled)
    assert math.isfinite(check.logprob_max_abs_err) and check.logprob_max_abs_err < 1e-4
    batch = engine.generate(PROMPTS, temperature=0.0, max_tokens=12)
    model = trainer.model.eval()
    tok = trainer.processing_class
    for prompt, got in zip(PROMPTS, batch.completion_ids):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=12, pad_token_id=tok.eos_token_id)
        assert out[0, ids.shape[1]:].tolist() == got[: out.shape[1] - ids.shape[1]]


def test_sampler_dtype_follows_the_trainer():
    """In TRL, the sampler computes in the dtype the trainer computes its logprobs in: the
    autocast dtype under mixed precision, else the weights' (the base weights under PEFT,
    whose adapters TRL may keep in float32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from atlas_rl.integrations.trl import trainer_dtype

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    assert trainer_dtype(model) == "float32"
    peft = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=2, target_modules=["q_proj"]))
    for name, p in peft.named_parameters():
        if "lora" in name:
            p.data = p.data.float()
    assert trainer_dtype(peft) == "bfloat16"

    class Accelerator:
        mixed_precision = "bf16"

    assert trainer_dtype(LlamaForCausalLM(config), Accelerator()) == "bfloat16"


def test_stock_grpo_trainer_with_two_added_lines(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from atlas_rl import AtlasConfig
    from atlas_rl.integrations.trl import enable_atlas   # added line 1

    enable_atlas(AtlasConfig(max_model_len=512, speculate_always=True))  # added line 2
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})
    probe = _CorpusProbe()
    trainer, changed = _train(lambda: GRPOTrainer(
        model=tiny_model_path, reward_funcs=_length_reward,
        args=_args(GRPOConfig, tmp_path), train_dataset=dataset), probe)
    assert trainer.vllm_generation.atlas_engine.speculation == "atlas"
    _assert_drop_in_contract(trainer, changed, probe)


def test_wandb_offline_gets_metrics_table_and_plot(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "atlas-rl-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pytest.importorskip("wandb")
    from datasets import Dataset
    from trl import GRPOConfig

    from atlas_rl import AtlasConfig
    from atlas_rl.integrations.trl import AtlasGRPOTrainer

    trainer = AtlasGRPOTrainer(
        model=tiny_model_path, reward_funcs=_length_reward,
        args=_args(GRPOConfig, tmp_path / "out", report_to=["wandb"]),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        atlas_config=AtlasConfig(max_model_len=512, speculate_always=True))
    trainer.train()
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    assert list(media.rglob("speculation_table*.table.json")), list(media.rglob("*"))
    assert list(media.rglob("speculation_plot*.png"))
    table = json.loads(next(media.rglob("speculation_table*.table.json")).read_text())
    assert "atlas/acceptance_length" in table["columns"] and len(table["data"]) == 2
    for row in trainer.state.log_history[:2]:
        assert 1.0 <= row["atlas/speedup_estimate"] and 0.0 <= row["atlas/drafted_fraction"] <= 1.0


def test_atlas_rloo_trainer(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from datasets import Dataset
    from trl import RLOOConfig

    from atlas_rl import AtlasConfig
    from atlas_rl.integrations.trl import AtlasRLOOTrainer

    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})
    probe = _CorpusProbe()
    trainer, changed = _train(lambda: AtlasRLOOTrainer(
        model=tiny_model_path, reward_funcs=_length_reward,
        args=_args(RLOOConfig, tmp_path), train_dataset=dataset,
        atlas_config=AtlasConfig(max_model_len=512, speculate_always=True)), probe)
    _assert_drop_in_contract(trainer, changed, probe)


def test_checkpoint_saves_and_resume_restores_the_speculator(tiny_model_path, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from atlas_rl import AtlasConfig
    from atlas_rl.integrations.trl import AtlasGRPOTrainer

    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})
    config = AtlasConfig(max_model_len=512, speculate_always=True)
    args = _args(GRPOConfig, tmp_path, save_strategy="steps", save_steps=1)
    first = AtlasGRPOTrainer(model=tiny_model_path, reward_funcs=_length_reward, args=args,
                             train_dataset=dataset, atlas_config=config)
    probe = _CorpusProbe()
    probe.trainer = first
    first.add_callback(probe.callback)
    first.train()
    saved = tmp_path / "checkpoint-1" / "atlas"
    assert (saved / "atlas_config.json").exists()
    assert probe.counts[0] > 0

    seen = []

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not seen:
                seen.append(second.vllm_generation.atlas_engine.speculator._past.num_tokens)

    second = AtlasGRPOTrainer(model=tiny_model_path, reward_funcs=_length_reward, args=args,
                              train_dataset=dataset, atlas_config=config)
    second.add_callback(FirstStep())
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    # resumed at step 1 with the speculator as it was saved there
    assert seen == [probe.counts[0]]


def test_enable_atlas_rejects_unknown_speculation():
    from atlas_rl.integrations.trl import enable_atlas

    with pytest.raises(ValueError, match="unknown speculation 'medusa'"):
        enable_atlas(speculation="medusa")


@pytest.fixture(autouse=True)
def _isolated():
    """TRL's colocated vLLM writes RANK/WORLD_SIZE/MASTER_* into os.environ: restore the
    environment after each test, and free the test's trainer and engine."""
    import gc

    from atlas_rl.engine import AtlasRolloutEngine

    saved = dict(os.environ)
    before = {id(o) for o in gc.get_objects() if isinstance(o, AtlasRolloutEngine)}
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    yield
    os.environ.clear()
    os.environ.update(saved)
    _free_leftover_engines(before)  # (collects first)


def _free_leftover_engines(before: set[int]) -> None:
    """A trainer's colocated engine outlives the trainer: the TRL generation object that
    holds it (its __dict__: 'llm', 'atlas_engine') stays referenced from outside Python's
    garbage collector (no gc-visible referrer, no thread; seen in this session, cause not
    found), ~1.2-2.4 GB per trainer test, ~7 GB by this module's end, which the rest of the
    suite then runs beside. Cut the engines of this test loose from what holds them, shut
    vLLM down, and hand the memory back."""
    import gc

    from atlas_rl.engine import AtlasRolloutEngine
    from tests.conftest import release_memory

    gc.collect()
    left = [o for o in gc.get_objects()
            if isinstance(o, AtlasRolloutEngine) and id(o) not in before]
    for engine in left:
        for holder in gc.get_referrers(engine):
            if isinstance(holder, dict) and holder.get("atlas_engine") is engine:
                holder.pop("llm", None)
                holder["atlas_engine"] = None
        engine.close()
        engine.__dict__.clear()
    del left
    release_memory()


def test_two_ranks_learn_the_same_rollouts(tiny_model_path, tmp_path, subprocess_env, free_port):
    """Data parallel on 2 CPU processes (torchrun, gloo): every rank's speculator learns
    the rollouts of both ranks, so their states are identical."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).parent / "probes" / "grpo_two_ranks.py"
    env = subprocess_env(VLLM_CPU_KVCACHE_SPACE=1, OMP_NUM_THREADS=1)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port), str(probe), tiny_model_path,
                           str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    everyone = sum(sum(r["local_tokens"]) for r in ranks)
    assert ranks[0]["local_tokens"] and everyone > sum(ranks[0]["local_tokens"])
    for r in ranks:
        assert r["corpus_tokens"] == everyone  # each learned both ranks' rollouts
    files0 = sorted(p.name for p in (tmp_path / "state0").iterdir())
    assert files0 == sorted(p.name for p in (tmp_path / "state1").iterdir())
    assert any(name.endswith(".safetensors") for name in files0)
    for name in files0:
        if name.endswith(".safetensors"):
            assert (tmp_path / "state0" / name).read_bytes() == (tmp_path / "state1" / name).read_bytes()


RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "smollm2-135m", "grpo_cpu.yaml")


def test_recipe_parses_into_trl_and_atlas_configs():
    from atlas_rl.integrations.trl.grpo import build_dataset, parse

    script, training, model, atlas = parse(["--config", RECIPE, "--max_steps", "3",
                                            "--atlas_max_lookahead", "4"])
    assert script.dataset == "builtin:math" and "correctness" in script.reward_funcs
    assert training.use_vllm and training.vllm_mode == "colocate" and training.use_cpu
    assert training.max_steps == 3 and training.num_generations == 4
    assert model.use_peft and model.lora_r == 16 and "q_proj" in model.lora_target_modules
    assert atlas.max_lookahead == 4 and atlas.max_model_len == 1024
    dataset = build_dataset(script)
    assert len(dataset) == script.num_prompts
    assert all(a is not None for a in dataset["answer"]) and dataset[0]["prompt"][-1]["role"] == "user"
    # a base model without a chat template gets the same prompts as plain text
    plain = build_dataset(script, chat_template=False)
    assert isinstance(plain[0]["prompt"], str) and plain["answer"] == dataset["answer"]
    assert plain[0]["prompt"].endswith(dataset[0]["prompt"][-1]["content"] + "\n")


def test_grpo_sizes_the_cpu_kv_cache_to_one_generation_batch(tiny_model_path, monkeypatch):
    """`atlas-rl grpo` on a CPU: the KV cache is what generation_batch_size sequences of
    vllm_max_model_length tokens need (not the 2 GiB default), unless the user chose."""
    from atlas_rl.backends.vllm.engine import cpu_kv_cache_gib_for
    from atlas_rl.integrations.trl.grpo import parse, size_kv_cache

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    _, training, _, atlas = parse(["--config", RECIPE])
    sized = size_kv_cache(atlas, training, tiny_model_path)
    want = cpu_kv_cache_gib_for(tiny_model_path, "float32", [(
        training.generation_batch_size, training.vllm_max_model_length + atlas.max_lookahead)])
    assert training.generation_batch_size == 8 and sized.cpu_kv_cache_gib == pytest.approx(want)
    assert sized.cpu_kv_cache_gib < atlas.cpu_kv_cache_gib == 2
    _, training, _, chosen = parse(["--config", RECIPE, "--atlas_cpu_kv_cache_gib", "1"])
    assert size_kv_cache(chosen, training, tiny_model_path).cpu_kv_cache_gib == 1
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert size_kv_cache(atlas, training, tiny_model_path).cpu_kv_cache_gib == 2


def test_reward_functions_trl_signature():
    from atlas_rl.rewards import answer_format, brevity, correctness, get_reward_funcs

    chat = [[{"role": "assistant", "content": "3 * 4 = 12\nAnswer: 12"}],
            [{"role": "assistant", "content": "Answer: 13"}],
            [{"role": "assistant", "content": "no idea"}]]
    assert correctness(chat, answer=["12", "12", "12"]) == [1.0, 0.0, 0.0]
    assert answer_format(chat) == [1.0, 1.0, 0.0]
    assert correctness(["so 7", "Answer: 8"], answer=["7", "7"]) == [1.0, 0.0]
    assert brevity(["a", "b"], completion_ids=[[1, 2], [1, 2, 3, 4]]) == [0.5, 0.0]
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        correctness(["x"])
    with pytest.raises(ValueError, match="unknown reward function 'vibes'"):
        get_reward_funcs(["vibes"])
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        answer_format([42])


@pytest.mark.slow
def test_atlas_rl_grpo_recipe_two_steps_on_the_real_model(real_model_path, tmp_path,
                                                          subprocess_env):
    """`atlas-rl grpo --config recipes/smollm2-135m/grpo_cpu.yaml --max_steps 2`: LoRA via
    PEFT, merged adapters synced into vLLM (logprobs match), atlas metrics logged."""
    import json
    import subprocess
    import sys

    env = subprocess_env(TRL_EXPERIMENTAL_SILENCE=1, VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, "-m", "atlas_rl.cli", "grpo", "--config", RECIPE,
                           "--max_steps", "2", "--max_completion_length", "48",
                           "--output_dir", str(tmp_path), "--save_strategy", "steps",
                           "--save_steps", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [row for row in state["log_history"] if "loss" in row]
    assert len(logs) == 2
    for row in logs:
        assert row["atlas/acceptance_length"] >= 1.0 and "atlas/update_seconds" in row
        assert row["sampling/sampling_logp_difference/max"] < 1e-3
    assert (tmp_path / "checkpoint-2" / "atlas" / "atlas_config.json").exists()
    assert (tmp_path / "adapter_config.json").exists()  # the LoRA adapter was saved


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_gpu_recipes_parse_into_the_configs_they_promise(size):
    import yaml

    from atlas_rl.integrations.trl.grpo import parse

    path = os.path.join(os.path.dirname(RECIPE), "..", f"qwen2.5-{size}", "grpo_gsm8k.yaml")
    raw = yaml.safe_load(open(path))
    assert raw["bf16"] is True and raw["model"] == f"Qwen/Qwen2.5-{size.upper()}-Instruct"
    # bf16 training needs a GPU: on this CPU machine parse with it off, everything else as written
    script, training, model, atlas = parse(["--config", path, "--bf16", "false"])
    assert script.dataset == "hf:openai/gsm8k:main@train"
    assert script.reward_funcs == ["correctness", "answer_format"]
    assert training.use_vllm and training.vllm_mode == "colocate"
    assert training.num_generations == 8 and training.max_completion_length == 512
    assert training.gradient_checkpointing and not model.use_peft
    assert atlas.max_lookahead == 8 and atlas.max_model_len == 2048


@pytest.mark.parametrize("name, kind, stage", [("ddp", "MULTI_GPU", None),
                                               ("zero2", "DEEPSPEED", 2),
                                               ("zero3", "DEEPSPEED", 3)])
def test_accelerate_configs(name, kind, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(os.path.dirname(RECIPE), "..", "accelerate_configs", f"{name}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type.value == kind
    assert config.mixed_precision == "bf16" and config.num_processes == 8
    if stage is not None:
        assert config.deepspeed_config["zero_stage"] == stage
        assert config.deepspeed_config["zero3_init_flag"] is (stage == 3)


def test_dashboard_spec_names_only_metrics_that_are_logged():
    from atlas_rl.integrations.trl import METRIC_KEYS
    from atlas_rl.integrations.wandb import PLOT_KEY, TABLE_KEY
    from atlas_rl.integrations.wandb.dashboard import main, spec
    from atlas_rl.metrics import ARMS, CLOSED_REASONS

    logged = {f"atlas/{k}" for k in METRIC_KEYS} | {
        f"atlas/closed_by_{r}" for r in CLOSED_REASONS} | {"atlas/closed_probe_steps"} | {
        "atlas/update_seconds", "atlas/speedup_estimate", "atlas/drafted_fraction",
        TABLE_KEY, PLOT_KEY, "reward", "sampling/sampling_logp_difference/max"} | {
        f"atlas/acceptance_rate_pos_{i}" for i in range(8)} | {
        f"atlas/drafts_{arm}" for arm in ARMS} | {
        "atlas/drafter_loss", "atlas/drafter_train_seconds", "atlas/update_budget_seconds",
        "atlas/drafter_rollbacks"}
    keys = {k for panels in spec().values() for p in panels for k in p["keys"]}
    assert keys <= logged, keys - logged
    assert main(["--print"]) == 0


def test_atlas_rl_grpo_knows_when_a_run_wants_deepspeed(tmp_path, monkeypatch):
    """`atlas-rl grpo` applies the DeepSpeed CPU fixes (before its training arguments
    exist) exactly when the run asks for DeepSpeed."""
    from atlas_rl.integrations.trl.grpo import wants_deepspeed

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not wants_deepspeed(["--config", RECIPE])
    assert wants_deepspeed(["--config", RECIPE, "--deepspeed", "ds.json"])
    with_ds = tmp_path / "grpo_ds.yaml"
    with_ds.write_text(open(RECIPE).read() + "\ndeepspeed: ds.json\n")
    assert wants_deepspeed(["--config", str(with_ds)])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch + DeepSpeed
    assert wants_deepspeed(["--config", RECIPE])
