"""atlas-rl inside TRL: `GRPOTrainer` and `RLOOTrainer` (``use_vllm=True``) decode
speculatively with atlas-rl, colocated (the engine in the trainer's process) or against a
rollout server (``vllm_mode="server"``, `atlas-rl serve`).

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
  ZeRO-3 gathers, FSDP and merged PEFT adapters; a LoRA model on one process goes as it
  is, merged by the engine without a copy) to ``engine.sync_weights``, which checks
  every tensor before loading any, rolls back a failed load, and works on vLLM's CPU
  backend too (TRL's ``model.load_weights`` path does not there);
- after every generation the adaptive speculator learns the rollouts of all ranks
  (gathered over torch.distributed), timed by TRL's profiling as ``atlas.update``, and
  ``atlas/*`` metrics join the trainer's metrics, so every ``report_to`` backend gets them;
- checkpoints hold the speculator's state (``checkpoint-N/atlas/``), and
  ``resume_from_checkpoint`` brings it back.

Server mode (``vllm_mode="server"``; the server speculates and learns by itself, so
generation needs nothing from the client):
- ``atlas/*`` metrics from the server's ``/metrics`` around each generation (acceptance,
  lookahead, tokens/s, the server's updates and published drafter version);
- checkpoints ask the server to save its speculators into ``checkpoint-N/atlas/``
  (``POST /atlas/save``: a path on the *server's* filesystem), and resuming loads them;
- TRL's client sends the server's API key (``enable_atlas(api_key=...)`` or
  ``ATLAS_RL_API_KEY``) and, where the server's weight transfer is atlas-rl's
  ``atlas_files`` (a CPU server), pushes weights through it instead of NCCL; a GPU
  server's NCCL path is TRL's own, untouched.

The seam into TRL (every assignment into a TRL object goes through `SEAM`): its table is
`atlas_rl.integrations.trl.hooks`.

What the trainer does with its ranks is the engine's business: `engine.learn` on every
rank keeps their speculators identical (`atlas_rl.ranks`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import weakref
from typing import Any

from atlas_rl.config import AtlasConfig
from atlas_rl.integrations.trl.hooks import SEAM
from atlas_rl.metrics import ROLLOUT_METRICS, trainer_metrics

logger = logging.getLogger(__name__)

SUPPORTED_TRL = ((1, 16), (1, 16))
_STATE: dict[str, Any] = {"config": None, "speculation": "atlas", "installed": False}
_PENDING: "weakref.WeakKeyDictionary[Any, tuple[dict, list]]" = weakref.WeakKeyDictionary()


def _trl_version() -> tuple[int, int]:
    import trl

    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    return major, minor


def enable_atlas(config: AtlasConfig | None = None, speculation: str = "atlas",
                 api_key: str | None = None) -> None:
    """Make TRL's colocated vLLM engines (built from now on) speculate with atlas-rl; in
    server mode, log the server's atlas metrics and checkpoint its speculators (the
    server speculates by itself). `api_key`: the rollout server's (default: the
    ``ATLAS_RL_API_KEY`` environment variable).

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
    _STATE["api_key"] = api_key
    if not _STATE["installed"]:
        _install()
        _STATE["installed"] = True


def _install() -> None:
    from trl.generation import vllm_generation as vg
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer

    cls = vg.VLLMGeneration
    SEAM.patch(cls, "_init_vllm", _wrap_init_vllm(cls._init_vllm, vg), key="init_vllm")
    SEAM.patch(cls, "sync_weights", _wrap_sync_weights(cls.sync_weights), key="sync_weights")
    SEAM.patch(cls, "generate", _wrap_generate(cls.generate), key="generate")
    for trainer_cls in (GRPOTrainer, RLOOTrainer):
        SEAM.patch(trainer_cls, "_generate_single_turn",
                   _wrap_generate_single_turn(trainer_cls._generate_single_turn),
                   key="generate_single_turn")
        SEAM.patch(trainer_cls, "_save_checkpoint",
                   _wrap_save_checkpoint(trainer_cls._save_checkpoint), key="save_checkpoint")
        SEAM.patch(trainer_cls, "_load_optimizer_and_scheduler",
                   _wrap_load_optimizer_and_scheduler(trainer_cls._load_optimizer_and_scheduler),
                   key="load_optimizer_and_scheduler")
    from trl.generation.vllm_client import VLLMClient

    from atlas_rl.integrations.trl import server as server_mode

    SEAM.patch(VLLMClient, "check_server", server_mode.wrap_check_server(
        VLLMClient.check_server, lambda: _STATE.get("api_key")), key="client_auth")
    SEAM.patch(VLLMClient, "init_communicator",
               server_mode.wrap_init_communicator(VLLMClient.init_communicator),
               key="client_init_communicator")
    SEAM.patch(VLLMClient, "update_named_params",
               server_mode.wrap_update_named_params(VLLMClient.update_named_params),
               key="client_update_params")
    for key in SEAM.keys:
        SEAM.record(key, "applied")


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
        SEAM.assign(self, {"atlas_engine": None}, key="engine_handle")
        if self.mode == "server":
            out = original(self)  # TRL's client (its auth and weight transfer: server.py)
            logger.info("atlas-rl: server mode: the rollout server speculates; atlas/* "
                        "metrics come from its /metrics")
            return out
        if self.mode != "colocate":
            logger.warning("atlas-rl: vllm_mode=%r is not sped up", self.mode)
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

        SEAM.assign(module, {"LLM": build}, key="vllm_llm")
        try:
            original(self)
        finally:
            SEAM.assign(module, {"LLM": trl_llm}, key="vllm_llm")
        SEAM.assign(self, {"atlas_engine": AtlasRolloutEngine.adopt(self.llm, speculation, config)},
                    key="engine_handle")
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
        from atlas_rl.backends.vllm.weight_sync import lora_only_peft_model

        dist = getattr(self, "_dist", None)
        sharded = dist is None or dist.is_zero3 or dist.is_fsdp
        if not sharded and lora_only_peft_model(self.model):
            # A LoRA model on one process: the engine merges it itself, new tensors for
            # the adapted layers only (TRL's merge-then-unmerge would need a copy of
            # every weight, 1 GB at 270M in float32, and rounds the base weights).
            engine.sync_weights(self.model)
            return
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
            client = getattr(self, "vllm_client", None)
            if self.mode != "server" or client is None:
                return original(self, prompts, images, num_generations, profiler)
            from atlas_rl.integrations.trl import server as server_mode

            out, stats = server_mode.generate_with_stats(
                client, lambda: original(self, prompts, images, num_generations, profiler))
            if stats:
                _PENDING[self] = (stats, None)
            return out
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
        _PENDING[self] = (engine.stats_since(before, seconds, completions),
                          [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)])
        return out

    return generate


# --- trainers -------------------------------------------------------------------

METRIC_KEYS = ROLLOUT_METRICS  # the rollout stats logged as atlas/<key> (atlas_rl.metrics)


def _wrap_generate_single_turn(original):
    @functools.wraps(original)
    def _generate_single_turn(self, *args, **kwargs):
        from atlas_rl.machine import generating

        with generating():  # a colocated engine's steps reuse freed blocks (machine.py)
            out = original(self, *args, **kwargs)
        vg = getattr(self, "vllm_generation", None)
        engine = getattr(vg, "atlas_engine", None)
        pending = _PENDING.pop(vg, None) if vg is not None else None
        if pending is not None and pending[1] is None:  # server mode: the server learnt
            metrics = self._metrics["train" if self.model.training else "eval"]
            from atlas_rl.integrations.trl.server import server_trainer_metrics

            for name, value in server_trainer_metrics(pending[0]).items():
                metrics[name].append(value)
            return out
        if engine is None or pending is None:
            return out
        from trl.extras.profiling import profiling_context

        stats, sequences = pending
        with profiling_context(self, "atlas.update"):
            update = engine.learn(sequences, stats.get("rollout_seconds"))  # on every rank
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        rollbacks = (engine.speculators["neural"].rollbacks
                     if "neural" in engine.speculators else 0.0)
        for name, value in trainer_metrics(stats, update, rollbacks).items():
            metrics[name].append(value)
        from atlas_rl.integrations.wandb import AtlasSpeculationCallback

        if not any(isinstance(c, AtlasSpeculationCallback)
                   for c in self.callback_handler.callbacks):
            self.add_callback(AtlasSpeculationCallback())
        return out

    return _generate_single_turn


CHECKPOINT_SUBDIR = "atlas"


def _engine_of(trainer):
    return getattr(getattr(trainer, "vllm_generation", None), "atlas_engine", None)


def _server_client(trainer):
    """TRL's client of an atlas rollout server (server mode, main process), else None."""
    vg = getattr(trainer, "vllm_generation", None)
    if getattr(vg, "mode", None) != "server":
        return None
    return getattr(vg, "vllm_client", None)


def _wrap_save_checkpoint(original):
    @functools.wraps(original)
    def _save_checkpoint(self, model, trial):
        original(self, model, trial)
        engine = _engine_of(self)
        client = _server_client(self)
        if (engine is None and client is None) or not self.args.should_save:
            return  # every rank's speculator is the same: the main process saves it
        import os

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if engine is not None:
            engine.save(os.path.join(folder, CHECKPOINT_SUBDIR))
        else:
            from atlas_rl.integrations.trl.server import save_server_state

            save_server_state(client, os.path.join(os.path.abspath(folder), CHECKPOINT_SUBDIR))

    return _save_checkpoint


def _wrap_load_optimizer_and_scheduler(original):
    @functools.wraps(original)
    def _load_optimizer_and_scheduler(self, checkpoint):
        original(self, checkpoint)
        engine = _engine_of(self)
        client = _server_client(self)
        if (engine is None and client is None) or checkpoint is None:
            return
        import os

        state = os.path.join(checkpoint, CHECKPOINT_SUBDIR)
        if os.path.isdir(state):
            if engine is not None:
                engine.load(state)
            else:
                from atlas_rl.integrations.trl.server import load_server_state

                load_server_state(client, os.path.abspath(state))
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
