"""atlas-rl inside TRL: `GRPOTrainer` and `RLOOTrainer` (``use_vllm=True``, colocate mode)
decode speculatively with atlas-rl.

Two added lines in a stock TRL script::

    from atlas_rl.integrations.trl import enable_atlas
    enable_atlas()                      # before the trainer is built; AtlasConfig(...) optional

or the subclasses `AtlasGRPOTrainer` / `AtlasRLOOTrainer` (``atlas_config=`` argument).

What changes (TRL 1.16; checked at `enable_atlas` time):
- the vLLM engine TRL builds (``VLLMGeneration._init_vllm`` calls ``vllm.LLM``) gets
  atlas-rl's speculative config, and an `AtlasRolloutEngine` adopts it
  (``trainer.vllm_generation.atlas_engine``);
- the sampler computes in the trainer's dtype (`trainer_dtype`) unless
  ``AtlasConfig.dtype`` is set: the logprobs vLLM returns are what TRL's importance-sampling
  correction compares with the trainer's, and what atlas-rl's lossless claim is judged on;
- weight sync (``VLLMGeneration.sync_weights``) feeds TRL's own parameter iterator (its
  ZeRO-3 gathers, FSDP and merged PEFT adapters) to ``engine.sync_weights``, which checks
  every tensor before loading any, rolls back a failed load, and works on vLLM's CPU
  backend too (TRL's ``model.load_weights`` path does not there);
- after every generation the adaptive speculator learns the rollouts of all ranks
  (gathered over torch.distributed), timed by TRL's profiling as ``atlas.update``, and
  ``atlas/*`` metrics join the trainer's metrics, so every ``report_to`` backend gets them;
- checkpoints hold the speculator's state (``checkpoint-N/atlas/``), and
  ``resume_from_checkpoint`` brings it back.
Server mode (``vllm_mode="server"``) is left untouched, with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

from atlas_rl.config import AtlasConfig

logger = logging.getLogger(__name__)

SUPPORTED_TRL = ((1, 16), (1, 16))
_STATE: dict[str, Any] = {"config": None, "speculation": "atlas", "installed": False}


def _trl_version() -> tuple[int, int]:
    import trl

    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    return major, minor


def enable_atlas(config: AtlasConfig | None = None, speculation: str = "atlas") -> None:
    """Make TRL's colocated vLLM engines (built from now on) speculate with atlas-rl.

    Idempotent; a later call changes the config used by engines built after it."""
    from atlas_rl.config import SPECULATION_METHODS

    if speculation not in SPECULATION_METHODS:
        raise ValueError(f"unknown speculation {speculation!r}: choose one of "
                         f"{', '.join(SPECULATION_METHODS)}")
    version = _trl_version()
    if not SUPPORTED_TRL[0] <= version <= SUPPORTED_TRL[1]:
        raise RuntimeError(
            f"atlas-rl's TRL integration is built for TRL 1.16 (found "
            f"{'.'.join(map(str, version))}): pip install 'trl==1.16.0', or drive "
            f"AtlasRolloutEngine yourself (examples/quickstart.py)")
    _STATE["config"] = config or AtlasConfig()
    _STATE["speculation"] = speculation
    if not _STATE["installed"]:
        _install()
        _STATE["installed"] = True


def _install() -> None:
    from trl.generation import vllm_generation as vg
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer

    cls = vg.VLLMGeneration
    cls._init_vllm = _wrap_init_vllm(cls._init_vllm, vg)
    cls.sync_weights = _wrap_sync_weights(cls.sync_weights)
    cls.generate = _wrap_generate(cls.generate)
    for trainer_cls in (GRPOTrainer, RLOOTrainer):
        trainer_cls._generate_single_turn = _wrap_generate_single_turn(
            trainer_cls._generate_single_turn)
        trainer_cls._save_checkpoint = _wrap_save_checkpoint(trainer_cls._save_checkpoint)
        trainer_cls._load_optimizer_and_scheduler = _wrap_load_optimizer_and_scheduler(
            trainer_cls._load_optimizer_and_scheduler)


# --- VLLMGeneration -----------------------------------------------------------------

def trainer_dtype(model, accelerator=None) -> str:
    """The dtype the trainer computes its logprobs in: the autocast dtype under mixed
    precision (accelerate's ``mixed_precision`` "bf16" / "fp16"), else the dtype of the
    model's weights (its input embeddings: the base weights under PEFT, where adapters
    may be float32 over a bfloat16 model)."""
    import torch

    mixed = getattr(accelerator, "mixed_precision", "no")
    if mixed in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[mixed]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", None)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")



def _wrap_init_vllm(original, module):
    @functools.wraps(original)
    def _init_vllm(self):
        self.atlas_engine = None
        self._atlas_pending = None
        if self.mode != "colocate":
            logger.warning("atlas-rl: vllm_mode=%r is not sped up (atlas-rl runs in colocate "
                           "mode, where the engine lives in the trainer's process)", self.mode)
            return original(self)
        from atlas_rl.backends.vllm import engine as backend
        from atlas_rl.engine import AtlasRolloutEngine

        config, speculation = _STATE["config"], _STATE["speculation"]
        if config.dtype is None:  # the sampler computes as the trainer does (module docstring)
            config = dataclasses.replace(config, dtype=trainer_dtype(self.model, self.accelerator))
        trl_llm = module.LLM

        def build(model, **kwargs):
            # TRL's choices win where it makes one (None: unset, ours stands).
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            return backend.build_llm(model, speculation, config, **kwargs)

        module.LLM = build
        try:
            original(self)
        finally:
            module.LLM = trl_llm
        self.atlas_engine = AtlasRolloutEngine.adopt(self.llm, speculation, config)
        logger.info("atlas-rl: TRL's vLLM engine speculates with %r", speculation)

    return _init_vllm


def _wrap_sync_weights(original):
    @functools.wraps(original)
    def sync_weights(self):
        engine = getattr(self, "atlas_engine", None)
        if engine is None:
            return original(self)
        if self.enable_sleep_mode:
            from trl.generation.vllm_generation import empty_cache

            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        # TRL's iterator gathers ZeRO-3 / FSDP shards and merges PEFT adapters, yielding
        # checkpoint names; its tensors change once it ends (adapters unmerged, shards
        # released), and the engine checks them all before loading any: so it copies them.
        engine.sync_weights(self._iter_named_params(), copy=True)

    return sync_weights


def _wrap_generate(original):
    @functools.wraps(original)
    def generate(self, prompts, images, num_generations, profiler=None):
        engine = getattr(self, "atlas_engine", None)
        if engine is None:
            return original(self, prompts, images, num_generations, profiler)
        from atlas_rl.rollout import Completion

        engine.begin_batch()
        before = engine.snapshot()
        start = time.perf_counter()
        out = original(self, prompts, images, num_generations, profiler)
        seconds = time.perf_counter() - start
        prompt_ids, completion_ids = out[0], out[1]
        completions = [Completion(prompt_index=i, prompt_ids=list(p), completion_ids=list(c),
                                  logprobs=[], finish_reason="")
                       for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
        self._atlas_pending = (engine.stats_since(before, seconds, completions),
                               [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)])
        return out

    return generate


# --- trainers -------------------------------------------------------------------

METRIC_KEYS = ("acceptance_length", "acceptance_rate", "lookahead", "tokens_per_s",
               "rollout_seconds")


def _gather_sequences(sequences: list[list[int]]) -> list[list[int]]:
    """Every rank's rollouts, in rank order (so that every rank's speculator learns the
    same data and their drafters stay identical)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sequences
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sequences)
    return [s for part in gathered for s in part]


def _learn_all_ranks(engine, sequences: list[list[int]], rollout_seconds: float | None = None) -> dict:
    """`engine.learn` on every rank's rollouts. With several ranks, every rank's suffix
    index learns the same sequences; the neural drafter's captured hidden states are
    gathered too, rank 0 trains (within its time budget) and its published weights are
    broadcast, so that the drafters of all ranks stay identical."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return engine.learn(sequences, rollout_seconds)
    sequences = _gather_sequences(sequences)
    neural = engine.speculators.get("neural")
    if neural is None or neural.frozen:
        return engine.learn(sequences, rollout_seconds)
    mine = neural.take_captured()
    chunks: list = [None] * dist.get_world_size()
    dist.all_gather_object(chunks, mine)
    for chunk in chunks:
        if chunk is not None:
            neural.add_examples(*chunk)
    rank = dist.get_rank()
    neural.frozen = rank != 0  # only rank 0 trains
    try:
        update = engine.learn(sequences, rollout_seconds)
    finally:
        neural.frozen = False
    state = [neural.published() if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    if rank != 0:
        neural.load_published(state[0])
    return update


def _wrap_generate_single_turn(original):
    @functools.wraps(original)
    def _generate_single_turn(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        vg = getattr(self, "vllm_generation", None)
        engine = getattr(vg, "atlas_engine", None)
        pending = getattr(vg, "_atlas_pending", None)
        if engine is None or pending is None:
            return out
        vg._atlas_pending = None
        from trl.extras.profiling import profiling_context

        stats, sequences = pending
        with profiling_context(self, "atlas.update"):
            update = _learn_all_ranks(engine, sequences, stats.get("rollout_seconds"))
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        for key in METRIC_KEYS:
            if key in stats:
                metrics[f"atlas/{key}"].append(float(stats[key]))
        for key, value in stats.items():
            if key.startswith("acceptance_rate_pos_"):
                metrics[f"atlas/{key}"].append(float(value))
        metrics["atlas/update_seconds"].append(float(update.get("update_seconds", 0.0)))
        for key in ("drafter_loss", "drafter_train_seconds", "update_budget_seconds"):
            if key in update:
                metrics[f"atlas/{key}"].append(float(update[key]))
        metrics["atlas/drafter_rollbacks"].append(float(engine.speculators["neural"].rollbacks)
                                                  if "neural" in engine.speculators else 0.0)
        for key, value in stats.items():  # which arm drafted, and how well
            if key.startswith("drafts_") or key.startswith("acceptance_length_"):
                metrics[f"atlas/{key}"].append(float(value))
        steps = stats.get("request_steps")
        if steps:
            # Without a baseline run: the factor by which speculation cut the target's
            # request-steps (tokens per request-step, 1 + accepted / request-steps). It
            # ignores what verifying drafts costs, so it bounds the speedup from above;
            # `atlas-rl bench` measures the speedup itself.
            metrics["atlas/speedup_estimate"].append(1.0 + stats["num_accepted_tokens"] / steps)
            hist = stats.get("lookahead_hist") or [steps]
            metrics["atlas/drafted_fraction"].append(1.0 - hist[0] / steps)
        if not getattr(self, "_atlas_callback", None):
            from atlas_rl.integrations.wandb import AtlasSpeculationCallback

            self._atlas_callback = AtlasSpeculationCallback()
            self.add_callback(self._atlas_callback)
        return out

    return _generate_single_turn


CHECKPOINT_SUBDIR = "atlas"


def _engine_of(trainer):
    return getattr(getattr(trainer, "vllm_generation", None), "atlas_engine", None)


def _wrap_save_checkpoint(original):
    @functools.wraps(original)
    def _save_checkpoint(self, model, trial):
        original(self, model, trial)
        engine = _engine_of(self)
        if engine is None or not self.args.should_save:
            return  # every rank's speculator is the same: the main process saves it
        import os

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        engine.save(os.path.join(folder, CHECKPOINT_SUBDIR))

    return _save_checkpoint


def _wrap_load_optimizer_and_scheduler(original):
    @functools.wraps(original)
    def _load_optimizer_and_scheduler(self, checkpoint):
        original(self, checkpoint)
        engine = _engine_of(self)
        if engine is None or checkpoint is None:
            return
        import os

        state = os.path.join(checkpoint, CHECKPOINT_SUBDIR)
        if os.path.isdir(state):
            engine.load(state)
        else:
            logger.warning("atlas-rl: checkpoint %s has no speculator state (%s/): the "
                           "speculator starts empty", checkpoint, CHECKPOINT_SUBDIR)

    return _load_optimizer_and_scheduler


# --- convenience subclasses -------------------------------------------------------

def _subclass(base_name: str):
    import importlib

    module = importlib.import_module(f"trl.trainer.{base_name.lower().replace('trainer', '')}_trainer")
    base = getattr(module, base_name)

    def __init__(self, *args, atlas_config: AtlasConfig | None = None,
                 speculation: str = "atlas", **kwargs):
        enable_atlas(atlas_config, speculation)
        base.__init__(self, *args, **kwargs)

    return type(f"Atlas{base_name}", (base,), {
        "__init__": __init__,
        "__doc__": f"TRL's {base_name} with atlas-rl speculation (``atlas_config=``, "
                   f"``speculation=``); everything else as {base_name}.",
        "__module__": __name__,
    })


def __getattr__(name: str):
    # Built on first use, so that importing this module does not import TRL.
    if name in ("AtlasGRPOTrainer", "AtlasRLOOTrainer"):
        cls = _subclass(name[len("Atlas"):])
        globals()[name] = cls
        return cls
    raise AttributeError(name)
