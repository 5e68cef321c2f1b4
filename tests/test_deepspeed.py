"""DeepSpeed ZeRO-2 and ZeRO-3 with atlas-rl, run for real: 2 ranks on the CPU
(``DS_ACCELERATOR=cpu``: DeepSpeed's CPU accelerator, collectives over gloo), stock TRL
``GRPOTrainer`` + `enable_atlas`, colocated vLLM (tests/probes/grpo_deepspeed.py).

Each run checks: DeepSpeed really drives training (a ``DeepSpeedEngine``, the ZeRO stage
asked for, ZeRO-3 parameters and the optimizer state sharded in halves); after every
weight sync the engine's greedy output equals the gathered policy's (transformers) and its
logprobs match, while an update not yet synced is seen; ``atlas/*`` metrics every step on
every rank; every rank's speculator learns the rollouts of both ranks, so their states
are identical; a checkpoint carries the speculator and resuming restores it (and the
weights the engine serves)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]' (make setup does)")

PROBE = Path(__file__).parent / "probes" / "grpo_deepspeed.py"
ACCELERATE_CONFIGS = Path(__file__).parent.parent / "recipes" / "accelerate_configs"
SEQUENCES_PER_STEP = 8   # per_device_train_batch_size 4 (= 1 prompt x 4 generations) x 2 ranks
LOGP_TOLERANCE = 1e-4    # float32 engine vs float32 transformers
ATLAS_KEYS = ("atlas/acceptance_length", "atlas/acceptance_rate", "atlas/lookahead",
              "atlas/tokens_per_s", "atlas/rollout_seconds", "atlas/update_seconds")


def _env(subprocess_env):
    return subprocess_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=1, VLLM_CPU_KVCACHE_SPACE=1)


def _run(launcher, script, args, env, timeout):
    proc = subprocess.run([sys.executable, "-m", *map(str, launcher), str(script),
                           *map(str, args)], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _torchrun(script, args, env, port, timeout):
    """torchrun; the probe gives GRPOConfig its DeepSpeed config (``deepspeed={...}``)."""
    _run(["torch.distributed.run", "--nproc_per_node", 2, "--master_port", port], script, args,
         env, timeout)


def _accelerate_launch(stage, script, args, env, port, timeout):
    """`accelerate launch` with the CPU recipe: the DeepSpeed config comes from the file."""
    config = ACCELERATE_CONFIGS / f"zero{stage}_cpu.yaml"
    _run(["accelerate.commands.launch", "--config_file", config, "--main_process_port", port],
         script, args, env, timeout)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check_run(ranks, out: Path, stage: int, first_step: int, steps: int) -> None:
    """What every run must show, `steps` optimizer steps from `first_step`."""
    for r in ranks:
        assert r["world"] == 2 and r["torch_world"] == 2
        assert r["deepspeed"] and r["engine_class"] == "DeepSpeedEngine"
        assert r["zero_stage"] == stage and r["distributed_type"] == "DistributedType.DEEPSPEED"
        assert r["global_step"] == first_step + steps
        assert sorted(r["compat"]) == ["accelerate_cpu_backend", "deepspeed_comm"]
        # ZeRO-2 shards the optimizer state, ZeRO-3 the parameters too
        assert r["sharding"]["optimizer"] == pytest.approx(0.5, abs=0.01)
        assert r["sharding"]["params"] == (pytest.approx(0.5, abs=0.01) if stage == 3 else 1.0)
        # a check after TRL's sync before each step's generation, and after a last sync
        assert [c["step"] for c in r["checks"]] == list(range(first_step, first_step + steps + 1))
        for check in r["checks"]:
            assert check["equal"], check
            # the drafter follows every sync of the gathered (ZeRO-3) policy
            assert check["drafter_reads_policy"] is True, check
            # (before the first batch a drafter with no static start has no head rows)
            assert check["drafter_head_is_policys"] in (True, "no draft vocabulary yet"), check
            assert check["max_logp_diff"] < LOGP_TOLERANCE, check
        assert all(c["drafter_head_is_policys"] is True
                   for c in r["checks"][1:]), r["checks"]  # from the first batch on
        # before that last sync, the last update had not reached the engine: seen
        assert r["final"]["max_logp_diff"] > 1e-3, r["final"]
        # atlas-rl's metrics on every step of this run, on every rank
        logged = [h for h in r["log_history"] if "loss" in h][first_step:]
        assert len(logged) == steps
        for entry in logged:
            assert all(key in entry for key in ATLAS_KEYS), sorted(entry)
        # every generation of both ranks learned, on every rank
        begin = r["corpus_at_begin"]["sequences"]
        assert [c["sequences"] for c in r["corpus"]] == [
            begin + SEQUENCES_PER_STEP * (i + 1) for i in range(steps)]
    assert ranks[0]["corpus"] == ranks[1]["corpus"]  # the same sequences, in the same order
    # The speculators' state is identical on both ranks. (atlas_config.json also holds the
    # controller's calibration and cost model: each rank's own measurements.)
    names = sorted(p.name for p in (out / "state0").iterdir() if p.name != "atlas_config.json")
    assert any(name.endswith(".safetensors") for name in names)
    assert names == sorted(p.name for p in (out / "state1").iterdir()
                           if p.name != "atlas_config.json")
    for name in names:
        assert (out / "state0" / name).read_bytes() == (out / "state1" / name).read_bytes(), name


def _check_resume(first: list[dict], resumed: list[dict], checkpoint: Path, out: Path) -> None:
    saved = sorted(p.name for p in (checkpoint / "atlas").iterdir())
    for r, run in enumerate(resumed):
        assert run["corpus_at_begin"] == first[r]["corpus"][-1]
        assert sorted(p.name for p in (out / f"resumed{r}").iterdir()) == saved
        for name in saved:
            assert ((out / f"resumed{r}" / name).read_bytes()
                    == (checkpoint / "atlas" / name).read_bytes()), name
        # the first sync after resuming serves the weights the first run ended with
        assert run["checks"][0]["engine"] == first[r]["final"]["policy"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_sync_learn_checkpoint_resume(stage, tiny_model_path, tmp_path,
                                                     subprocess_env, free_port):
    """Tiny model: 2 GRPO steps under ZeRO-`stage`, launched by `accelerate launch` with
    recipes/accelerate_configs/zero{stage}_cpu.yaml (``use_cpu=False``; checkpoint at step
    2); then a resume from that checkpoint for a third step, launched by torchrun with the
    DeepSpeed config in ``GRPOConfig(deepspeed=..., use_cpu=True)``."""
    env = _env(subprocess_env)
    first_out, resumed_out = tmp_path / "run", tmp_path / "resumed"
    _accelerate_launch(stage, PROBE, [tiny_model_path, first_out, "--stage", stage,
                                      "--max-steps", 2, "--save-steps", 2],
                       env, free_port, timeout=900)
    first = _ranks(first_out)
    assert all(r["from_launcher"] and not r["use_cpu"] for r in first)
    _check_run(first, first_out, stage, first_step=0, steps=2)
    checkpoint = first_out / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "global_step2").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (checkpoint / "atlas" / "atlas_config.json").is_file()

    _torchrun(PROBE, [tiny_model_path, resumed_out, "--stage", stage, "--max-steps", 3,
                      "--resume", checkpoint, "--use-cpu"], env, free_port, timeout=900)
    resumed = _ranks(resumed_out)
    assert not any(r["from_launcher"] for r in resumed) and all(r["use_cpu"] for r in resumed)
    _check_run(resumed, resumed_out, stage, first_step=2, steps=1)
    _check_resume(first, resumed, checkpoint, resumed_out)


@pytest.mark.slow
def test_zero3_real_model_one_step_checkpoint_resume(real_model_path, tmp_path, subprocess_env,
                                                     free_port):
    """SmolLM2-135M-Instruct, float32, full fine-tuning, ZeRO-3 on 2 ranks (torchrun,
    ``GRPOConfig(deepspeed=..., use_cpu=True)``): 1 GRPO step with a checkpoint, then a
    resume for a second step (with ``use_cpu=False``). ~3-5 min on 2 cores."""
    env = _env(subprocess_env)
    first_out, resumed_out = tmp_path / "run", tmp_path / "resumed"
    _torchrun(PROBE, [real_model_path, first_out, "--stage", 3, "--max-steps", 1,
                      "--save-steps", 1, "--use-cpu"], env, free_port, timeout=1500)
    first = _ranks(first_out)
    assert all(r["use_cpu"] for r in first)
    _check_run(first, first_out, 3, first_step=0, steps=1)
    checkpoint = first_out / "checkpoint-1"
    _torchrun(PROBE, [real_model_path, resumed_out, "--stage", 3, "--max-steps", 2,
                      "--resume", checkpoint], env, free_port, timeout=1500)
    resumed = _ranks(resumed_out)
    assert not any(r["use_cpu"] for r in resumed)
    _check_run(resumed, resumed_out, 3, first_step=1, steps=1)
    _check_resume(first, resumed, checkpoint, resumed_out)


STATE_SCRIPT = '''
import json, os, sys
out, mode, cpu = sys.argv[1], sys.argv[2], sys.argv[3]
status = {}
if mode == "fix":
    from atlas_rl.compat import deepspeed as ds_compat
    status = ds_compat.apply()
from transformers import TrainingArguments
args = TrainingArguments(output_dir=out, report_to="none", bf16=False, use_cpu=cpu == "cpu",
                         per_device_train_batch_size=4, deepspeed={
    "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "train_batch_size": "auto"})
from accelerate.state import PartialState
state = PartialState()
import deepspeed
from transformers.integrations.deepspeed import deepspeed_config
try:  # what from_pretrained does for a ZeRO-3 model (TRL: before the Trainer exists)
    deepspeed.zero.Init(config_dict_or_path=deepspeed_config())
    zero_init = "ok"
except AssertionError as error:
    zero_init = str(error)
with open(os.path.join(out, f"{mode}-{cpu}{os.environ['RANK']}.json"), "w") as f:
    json.dump({"status": status, "type": str(state.distributed_type), "backend": state.backend,
               "num_processes": state.num_processes, "process_index": state.process_index,
               "world_size": args.world_size, "zero_init": zero_init}, f)
'''


def test_compat_fixes_what_accelerate_and_deepspeed_refuse_on_cpu(tmp_path, subprocess_env,
                                                                  free_port):
    """What atlas_rl/compat/deepspeed.py works round, with ``use_cpu`` True and False:
    without it, ZeRO-3's zero.Init (from_pretrained) fails its batch check against a world
    of one (``use_cpu=True``: deepspeed.comm is not initialised), or accelerate counts every
    rank as rank 0 of 1 (``use_cpu=False``: no CPU backend for a DeepSpeed launch); with
    `apply()`, both are right. Where a release fixed one, `apply()` must say it is not
    needed."""
    script = tmp_path / "state.py"
    script.write_text(STATE_SCRIPT)
    env = _env(subprocess_env)
    runs = {}
    for mode in ("fix", "nofix"):
        for cpu in ("cpu", "nocpu"):
            _torchrun(script, [tmp_path, mode, cpu], env, free_port, timeout=300)
            runs[mode, cpu] = [json.loads((tmp_path / f"{mode}-{cpu}{r}.json").read_text())
                               for r in (0, 1)]
    for cpu in ("cpu", "nocpu"):
        for r, state in enumerate(runs["fix", cpu]):
            assert state["num_processes"] == 2 and state["process_index"] == r, state
            assert state["world_size"] == 2 and state["backend"] == "gloo", state
            assert state["zero_init"] == "ok", state
    status = runs["fix", "cpu"][0]["status"]
    bare_cpu, bare_nocpu = runs["nofix", "cpu"], runs["nofix", "nocpu"]
    if status["deepspeed_comm"] == "applied":
        assert all("8 != 4 * 1 * 1" in s["zero_init"] for s in bare_cpu), bare_cpu
    else:
        assert status["deepspeed_comm"].startswith("not needed"), status
    if status["accelerate_cpu_backend"] == "applied":
        assert [(s["num_processes"], s["process_index"]) for s in bare_nocpu] == [(1, 0)] * 2
    else:
        assert status["accelerate_cpu_backend"].startswith("not needed"), status
        assert [s["process_index"] for s in bare_nocpu] == [0, 1]


def test_compat_off_leaves_accelerate_alone(subprocess_env):
    code = ("from atlas_rl.compat import deepspeed as d; from accelerate.state import "
            "PartialState as P; f = P._prepare_backend; s = d.apply(); "
            "assert P._prepare_backend is f; print(sorted(set(s.values())))")
    env = subprocess_env(ATLAS_RL_COMPAT="off", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['off (ATLAS_RL_COMPAT=off)']"


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_accelerate_configs(stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"zero{stage}_cpu.yaml"))
    assert config.distributed_type.value == "DEEPSPEED" and not config.use_cpu
    assert config.mixed_precision == "no" and config.num_processes == 2
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.deepspeed_config["zero3_init_flag"] is (stage == 3)
