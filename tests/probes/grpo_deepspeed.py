"""Run under `torchrun --nproc_per_node 2` (or `accelerate launch --config_file
recipes/accelerate_configs/zero{2,3}_cpu.yaml`) with DS_ACCELERATOR=cpu: GRPO through the
atlas-rl drop-in under DeepSpeed ZeRO-2 / ZeRO-3 (or, with --stage 0, plain DDP) on the CPU.

After every weight sync into the colocated vLLM engine, each rank gathers the policy
(TRL's `unwrap_model_for_generation`: the ZeRO-3 shards of every parameter) and compares
transformers' greedy output with the engine's greedy output on a few prompts, and the
engine's logprobs of its tokens with the policy's. After training the check runs once
before a last sync (TRL syncs before each generation only, so the last update has not
reached the engine: "final") and once after it. Each rank writes rank{r}.json (what it
saw) and its speculator state (state{r}/); with --save-steps, checkpoints carry it too;
with --resume CKPT, the engine's state right after the checkpoint was loaded goes to
resumed{r}/. --stage 0 --no-check: the DDP baseline for step times.

    python -m torch.distributed.run --nproc_per_node 2 tests/probes/grpo_deepspeed.py \
        MODEL OUT --stage 3 --max-steps 2 [--save-steps 2] [--resume OUT/checkpoint-2]
"""

import argparse
import hashlib
import json
import os
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--stage", type=int, choices=(0, 2, 3), default=3,
                    help="DeepSpeed ZeRO stage; 0: no DeepSpeed (DDP over gloo, use_cpu=True)")
parser.add_argument("--max-steps", type=int, default=2)
parser.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
parser.add_argument("--max-completion-length", type=int, default=16)
parser.add_argument("--use-cpu", action="store_true",
                    help="GRPOConfig(use_cpu=True) with DeepSpeed too (always with --stage 0)")
parser.add_argument("--learning-rate", type=float, default=1e-3)
parser.add_argument("--no-check", action="store_true",
                    help="skip the greedy checks after each sync (for timing)")
cli = parser.parse_args()

# `accelerate launch --config_file recipes/accelerate_configs/zero{2,3}_cpu.yaml` passes
# its DeepSpeed config through the environment: then GRPOConfig gets none of its own.
from_launcher = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
if cli.stage:  # before GRPOConfig: building it sets up torch.distributed
    from atlas_rl.compat import deepspeed as ds_compat

    compat_status = ds_compat.apply()
else:
    compat_status = {}

import torch
from atlas_rl.integrations.trl import enable_atlas
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.generation import vllm_generation as vg
from trl.models.utils import unwrap_model_for_generation

from atlas_rl import AtlasConfig

CHECK_PROMPTS = ["def fib(n):\n    if n <", "The capital of France is", "1, 2, 3, 4,"]
CHECK_TOKENS = 12

enable_atlas(AtlasConfig(max_model_len=512, speculate_always=True, cpu_kv_cache_gib=1))

tokenizer = AutoTokenizer.from_pretrained(cli.model)
check_ids = [tokenizer(p).input_ids for p in CHECK_PROMPTS]
trainer = None
checks: list[dict] = []


def greedy_check() -> dict:
    """The engine's greedy completions vs the gathered policy's (transformers, eval mode,
    float32). A collective under ZeRO-3: every rank runs it."""
    engine = trainer.vllm_generation.atlas_engine
    batch = engine.generate(check_ids, temperature=0.0, max_tokens=CHECK_TOKENS)
    result = {"step": trainer.state.global_step, "engine": [], "policy": [],
              "max_logp_diff": 0.0, "min_top2_margin": float("inf")}
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
        training = model.training
        model.eval()
        with torch.no_grad():
            for prompt, completion in zip(check_ids, batch.completions):
                ids = torch.tensor([prompt])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=CHECK_TOKENS, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=tokenizer.eos_token_id)
                result["policy"].append(out[0, len(prompt):].tolist())
                result["engine"].append(list(completion.completion_ids))
                # the policy's logprobs of the engine's tokens (teacher-forced)
                full = torch.tensor([prompt + list(completion.completion_ids)])
                logits = model(full).logits[0, len(prompt) - 1:-1].float()
                logp = torch.log_softmax(logits, -1)
                chosen = logp.gather(1, torch.tensor(completion.completion_ids)[:, None])[:, 0]
                diff = (chosen - torch.tensor(completion.logprobs)).abs().max().item()
                top2 = logits.topk(2, -1).values
                result["max_logp_diff"] = max(result["max_logp_diff"], diff)
                result["min_top2_margin"] = min(result["min_top2_margin"],
                                                (top2[:, 0] - top2[:, 1]).min().item())
            # the drafter reads the policy just synced: its head rows are the gathered
            # policy's (in the engine's dtype), not a stale or zeroed copy
            neural = engine.speculators.get("neural")
            head_rows = neural.draft_head_rows() if neural is not None else None
            if neural is not None and head_rows is None and neural.vocab is None:
                # no static drafter for this model: no draft vocabulary, so no head rows,
                # until the first batch of rollouts chooses one
                result["drafter_head_is_policys"] = "no draft vocabulary yet"
            elif head_rows is not None:
                ids, rows = head_rows
                embed = model.get_input_embeddings().weight.detach()
                result["drafter_head_is_policys"] = torch.equal(
                    rows, embed.to(neural._head.dtype).index_select(0, ids).float())
        model.train(training)
    result["drafter_reads_policy"] = engine.proposer.drafter_reads_policy()
    result["equal"] = result["engine"] == result["policy"]
    return result


if not cli.no_check:
    synced = vg.VLLMGeneration.sync_weights  # atlas-rl's (enable_atlas installed it)

    def sync_and_check(self):
        synced(self)
        checks.append(greedy_check())

    vg.VLLMGeneration.sync_weights = sync_and_check


def sharding() -> dict:
    """How much of the model and of the optimizer state this rank holds (1.0: all of it).
    ZeRO-3 parameters carry their full size (``ds_numel``) and this rank's partition
    (``ds_tensor``); ZeRO-1/2 optimizers hold this rank's flat fp32 partitions."""
    params = list(trainer.model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    flat = (getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
            or getattr(optimizer, "fp32_partitioned_groups_flat", None))  # ZeRO-3
    return {"params": local / total,
            "optimizer": sum(t.numel() for t in flat) / total if flat else None}


def speculator_digest(engine) -> dict:
    tensors, _ = engine.speculator.state()
    return {"sequences": int(tensors["corpus_lengths"].numel()),
            "tokens": int(tensors["corpus_lengths"].sum()),
            "sha": hashlib.sha256(tensors["corpus_tokens"].numpy().tobytes()).hexdigest()}


class Recorder(TrainerCallback):
    def __init__(self):
        self.step_seconds, self.corpus, self.start, self.sharding = [], [], None, None

    def on_train_begin(self, args, state, control, **kwargs):
        engine = trainer.vllm_generation.atlas_engine
        self.corpus_at_begin = speculator_digest(engine)
        if cli.resume:  # the checkpoint was loaded just before this
            engine.save(os.path.join(cli.out, f"resumed{trainer.accelerator.process_index}"))

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self.start)
        self.sharding = sharding()
        self.corpus.append(speculator_digest(trainer.vllm_generation.atlas_engine))


prompts = ["one two three four one two three", "def add(a, b):\n    return",
           "The quick brown fox", "import os\nimport sys\nimport"]
ds_config = None
if cli.stage and not from_launcher:
    ds_config = {"zero_optimization": {"stage": cli.stage}, "bf16": {"enabled": False},
                 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    if cli.stage == 3:
        ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
args = GRPOConfig(output_dir=cli.out, use_vllm=True, vllm_mode="colocate",
                  use_cpu=cli.use_cpu or not cli.stage, deepspeed=ds_config,
                  per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=cli.max_completion_length, max_steps=cli.max_steps,
                  logging_steps=1, report_to="none", learning_rate=cli.learning_rate, bf16=False,
                  # constant: with the default linear schedule, a run resumed from the
                  # last step of a shorter one trains at lr 0 (the update is not seen)
                  lr_scheduler_type="constant",
                  save_strategy="steps" if cli.save_steps else "no",
                  save_steps=cli.save_steps or 500, seed=0)
recorder = Recorder()
trainer = GRPOTrainer(model=cli.model, args=args, callbacks=[recorder],
                      reward_funcs=lambda completions, **kw: [len(c) / 100.0 for c in completions],
                      train_dataset=Dataset.from_dict({"prompt": prompts * 4}))
started = time.perf_counter()
trainer.train(resume_from_checkpoint=cli.resume)
train_seconds = time.perf_counter() - started

engine = trainer.vllm_generation.atlas_engine
rank = trainer.accelerator.process_index
final = None
if not cli.no_check:
    # TRL syncs before each generation, so the last update has not reached the engine:
    # the check must see the difference (it is not blind), then a sync must remove it.
    final = greedy_check()
    trainer.vllm_generation.sync_weights()  # TRL's sync, through atlas-rl (+ the check)
engine.save(os.path.join(cli.out, f"state{rank}"))
plugin = trainer.accelerator.state.deepspeed_plugin
with open(os.path.join(cli.out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": trainer.accelerator.num_processes,
               "torch_world": torch.distributed.get_world_size(),
               "compat": compat_status, "deepspeed": trainer.is_deepspeed_enabled,
               "from_launcher": from_launcher, "use_cpu": args.use_cpu,
               "zero_stage": plugin.zero_stage if plugin is not None else 0,
               "distributed_type": str(trainer.accelerator.distributed_type),
               "engine_class": type(trainer.model_wrapped).__name__,
               "checks": checks, "final": final, "sharding": recorder.sharding,
               "step_seconds": recorder.step_seconds,
               "train_seconds": train_seconds, "corpus_at_begin": recorder.corpus_at_begin,
               "corpus": recorder.corpus, "global_step": trainer.state.global_step,
               "log_history": trainer.state.log_history}, f, default=str)
