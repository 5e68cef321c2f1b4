"""New policy weights into a running vLLM engine, all or nothing.

A sync has three stages:

1. **check** (before anything reaches vLLM): every incoming tensor is a parameter of the
   checkpoint the engine was built from (names), with that parameter's shape, a floating
   dtype, and finite values. A refused sync raises `WeightSyncError`, naming each bad
   parameter and what was expected; the engine keeps serving the weights it had.
2. **load**: vLLM's ``model_runner.reload_weights`` (checkpoint format; it works on the CPU
   backend, where TRL's ``model.load_weights`` path does not: the CPU backend repacks
   linear weights and their parameters lose ``weight_loader``), then the tied LM head's
   CPU GEMM handle is rebuilt (`compat.vllm_cpu.refresh_tied_lm_head`) and the prefix
   cache dropped (its KV was computed with the old weights).
3. **roll back** if the load itself fails (after checks, that is vLLM's or the iterator's
   fault): vLLM 0.32 reloads layer by layer, moving each layer to the meta device until
   all its weights have arrived, so an exception midway leaves some layers new, some on
   the meta device and stale buffered loads behind (the next ``generate`` fails on meta
   tensors; the next reload trips over the buffered loads). We clear the buffered loads,
   let vLLM put every unfinished layer's tensors back, and reload the previous weights:
   the last synced tensors (kept on the host in the engine's dtype), and the checkpoint
   on disk for any parameter never synced. Only if that fails too is the engine marked
   broken, and it then refuses to generate with an error instead of computing on meta
   tensors.

Cost on SmolLM2-135M (the note of issue 15 has the figures): the checks are one pass of
``isfinite`` over the weights; the rollback copy is one host copy of the weights in the
engine's dtype, refreshed on every sync (``AtlasConfig.sync_rollback=False`` skips it and
keeps only the checks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

Weights = Iterable[tuple[str, torch.Tensor]]

# PEFT wraps names; TRL strips these before it hands weights over (``_iter_named_params``).
_PEFT_MARKERS = ("base_model.model.", ".base_layer.", "lora_A", "lora_B")


class WeightSyncError(ValueError):
    """A sync refused before it touched the engine: the engine serves its old weights."""


class EngineBrokenError(RuntimeError):
    """A failed load could not be rolled back: the engine must be rebuilt."""


def named_tensor(item) -> tuple[str, torch.Tensor]:
    """One (name, tensor) pair of a sync, or `WeightSyncError` saying what to pass."""
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)):
        raise WeightSyncError(
            f"sync_weights: expected (name, tensor) pairs, got {type(item).__name__} "
            f"{str(item)[:60]!r}: pass a model, a state dict or (name, tensor) pairs")
    return item


def named_weights(model_or_state_dict) -> Iterable:
    """(name, tensor) pairs of what `AtlasRolloutEngine.sync_weights` takes: an nn.Module
    (its state dict; a PEFT LoRA model: its merged weights, `merged_lora_weights`), a
    mapping, or an iterable of pairs (left as it is)."""
    from collections.abc import Mapping

    if isinstance(model_or_state_dict, torch.nn.Module):
        if lora_only_peft_model(model_or_state_dict):
            return merged_lora_weights(model_or_state_dict)
        return model_or_state_dict.state_dict().items()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict.items()
    return model_or_state_dict


def lora_only_peft_model(model) -> bool:
    """A PEFT model whose every adapter is LoRA and that saves no whole modules: what
    `merged_lora_weights` merges exactly. False for any other module (PEFT not installed
    included)."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not hasattr(model, "get_base_model"):
        return False
    try:
        from peft import LoraConfig
    except ImportError:
        return False
    return all(isinstance(c, LoraConfig) and not getattr(c, "modules_to_save", None)
               for c in peft_config.values())


def lora_layers(peft_model) -> dict:
    """{name of the adapted weight in the base model: its LoRA layer} of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.base_layer.weight": module
            for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, LoraLayer)}


def lora_delta(module) -> torch.Tensor | None:
    """The sum of a LoRA layer's active adapters' deltas (scale x B A), None without one."""
    active = [a for a in module.active_adapters if a in module.lora_A]
    return sum(module.get_delta_weight(a) for a in active) if active else None


def merged_lora_weights(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, weight) of a PEFT LoRA model with its active adapters' deltas
    added (`lora_delta`), one tensor at a time, without touching the model. Merging in
    place then unmerging (what TRL's iterator does) rounds the base weights a little at
    every sync, and its tensors change once iteration ends, so they must be copied; here
    only the adapted layers' weights are new tensors, every other one is the model's own."""
    layers = lora_layers(peft_model)
    with torch.no_grad():
        for name, p in peft_model.get_base_model().named_parameters():
            if "lora_" in name:
                continue
            module = layers.get(name)
            delta = None if module is None or module.merged else lora_delta(module)
            yield name.replace(".base_layer.", "."), (p if delta is None else p + delta).detach()


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    floating: bool


def _local_model_dir(model: str) -> Path | None:
    path = Path(model)
    if path.is_dir():
        return path
    try:  # a hub id that vLLM resolved through the local hub cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001  (no hub, not cached, not a repo id)
        return None


def checkpoint_spec(model: str) -> dict[str, ParamSpec] | None:
    """Names, shapes and dtype kind of every tensor in the model's safetensors checkpoint
    (headers only: nothing is read from disk but the metadata), plus ``lm_head.weight``
    for a tied head, which transformers' ``state_dict`` lists and vLLM skips. None when the
    checkpoint is not local safetensors: names and shapes are then left unchecked."""
    folder = _local_model_dir(model)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    if not files:
        return None
    from safetensors import safe_open

    spec: dict[str, ParamSpec] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                spec[name] = ParamSpec(tuple(sl.get_shape()), sl.get_dtype().startswith(("F", "BF")))
    config = folder / "config.json"
    tied = config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    embed = next((n for n in spec if n.endswith("embed_tokens.weight")), None)
    if tied and embed is not None and "lm_head.weight" not in spec:
        spec["lm_head.weight"] = spec[embed]
    return spec


def _checkpoint_tensors(model: str, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    folder = _local_model_dir(model)
    for file in sorted(folder.glob("*.safetensors")) if folder is not None else []:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name not in skip:
                    yield name, f.get_tensor(name)


class LLMTarget:
    """The model a sync loads into, in an in-process ``vllm.LLM``."""

    def __init__(self, llm):
        self.llm = llm
        self.vllm_config = llm.llm_engine.vllm_config

    def model(self):
        from atlas_rl.backends.vllm.hooks import model_runner

        return model_runner(self.llm).get_model()

    def reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from atlas_rl.backends.vllm.hooks import model_runner

        model_runner(self.llm).reload_weights(weights_iterator=iter(weights))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


class ModelTarget:
    """The model a sync loads into, inside a vLLM worker (a weight-transfer engine holds
    the model and the config, not the runner). The prefix cache lives with the
    scheduler, not here: the caller resets it (TRL's client does after every sync, and
    `atlas-rl serve` pauses and clears it around the load)."""

    def __init__(self, model, vllm_config):
        self._model = model
        self.vllm_config = vllm_config

    def model(self):
        return self._model

    def reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        reload_weights(self.vllm_config, self._model, weights_iterator=iter(weights),
                       weights_path=None, is_checkpoint_format=True)

    def reset_prefix_cache(self) -> None:
        pass


class WeightSync:
    """One engine's weight sync: `sync(weights)` checks, loads, and rolls back on failure.

    ``target``: an in-process ``vllm.LLM`` or a `ModelTarget` (in a worker).
    ``allow_nonfinite``: load NaN/inf weights instead of refusing them.
    ``keep_previous``: keep a host copy of the synced weights (engine dtype) to roll back
    to; without it a failed load leaves the engine broken."""

    def __init__(self, target, model: str, *, allow_nonfinite: bool = False,
                 keep_previous: bool = True):
        self.target = target if isinstance(target, (LLMTarget, ModelTarget)) else LLMTarget(target)
        self.model = model
        self.allow_nonfinite = allow_nonfinite
        self.keep_previous = keep_previous
        self.dtype: torch.dtype = self.target.vllm_config.model_config.dtype
        self.spec = checkpoint_spec(model)
        if self.spec is None:
            logger.warning("atlas-rl: no local safetensors checkpoint for %r: weight syncs "
                           "check dtypes and finiteness, not names and shapes; a failed "
                           "load rolls back to synced weights only", model)
        self.previous: dict[str, torch.Tensor] = {}
        self.broken: str | None = None
        # how a user loads non-finite weights anyway, for the refusal's message
        self.nonfinite_override = (", or AtlasConfig(allow_nonfinite_weights=True) to load "
                                   "them anyway")
        self.last_timings: dict[str, float] = {}

    # --- 1. check ---------------------------------------------------------------------

    def stage(self, weights: Weights, copy: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Read ``weights`` once and check them all; returns (name, tensor) pairs ready to
        load. ``copy``: copy each tensor (to the host, in the engine's dtype) as it is read,
        for iterators whose tensors change once iteration ends (merged PEFT adapters,
        gathered ZeRO-3 shards: TRL's ``_iter_named_params``)."""
        staged, problems, seen = [], [], set()
        for item in weights:
            name, tensor = named_tensor(item)
            tensor = tensor.detach()
            if copy:
                tensor = tensor.to("cpu", self.dtype, copy=True) if tensor.is_floating_point() \
                    else tensor.to("cpu", copy=True)
            problem = self._check(name, tensor, seen)
            if problem:
                problems.append(problem)
            seen.add(name)
            staged.append((name, tensor))
        if problems:
            shown = "\n".join(f"  - {p}" for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise WeightSyncError(
                f"sync_weights refused {len(problems)} of {len(staged)} tensors; nothing was "
                f"loaded, the engine keeps serving its current weights:\n{shown}{more}")
        return staged

    def _check(self, name: str, t: torch.Tensor, seen: set[str]) -> str | None:
        if name in seen:
            return f"{name!r}: given twice in one sync"
        expected = None if self.spec is None else self.spec.get(name)
        if self.spec is not None and expected is None:
            hint = ("strip PEFT's names (merge the adapter: model.merge_and_unload())"
                    if any(m in name for m in _PEFT_MARKERS) else
                    "pass checkpoint names, as transformers' state_dict() has them "
                    f"(e.g. {next(iter(self.spec))!r})")
            return f"{name!r}: not a parameter of {self.model!r}: {hint}"
        if not t.is_floating_point():
            return (f"{name!r}: dtype {str(t.dtype).removeprefix('torch.')}, expected a "
                    f"floating dtype (the engine computes in {str(self.dtype).removeprefix('torch.')})")
        if expected is not None and tuple(t.shape) != expected.shape:
            return f"{name!r}: shape {tuple(t.shape)}, expected {expected.shape} as in the checkpoint"
        if t.device.type == "meta":
            return f"{name!r}: a meta tensor (no data): materialise the model before syncing"
        # A NaN or inf anywhere makes the sum NaN or inf, so a finite sum clears the tensor
        # in one reduction (12x faster here than an elementwise isfinite); the count of bad
        # values is only computed for the message.
        if not self.allow_nonfinite and not bool(torch.isfinite(t.sum())):
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                return (f"{name!r}: {bad} of {t.numel()} values are NaN or inf (a diverged "
                        f"update?); fix the update{self.nonfinite_override}")
        return None

    # --- 2. load, 3. roll back ----------------------------------------------------------

    def sync(self, weights: Weights, copy: bool = False) -> None:
        """`stage` then `load`, timed into ``last_timings``."""
        import time

        start = time.perf_counter()
        staged = self.stage(weights, copy=copy)
        checked = time.perf_counter()
        self.load(staged, owned=copy)
        self.last_timings = {"check_seconds": checked - start,
                             "load_seconds": time.perf_counter() - checked}

    def load(self, staged: Iterable[tuple[str, torch.Tensor]], owned: bool = False) -> None:
        """Load checked weights; if vLLM or the iterator fails midway, reload the previous
        weights and re-raise (the engine keeps serving them). ``owned``: the tensors are
        ours (`stage` copied them), so they can be kept as they are to roll back to;
        otherwise the caller owns them (an optimizer updates them in place) and we keep
        copies."""
        if self.broken:
            raise EngineBrokenError(self.broken)
        loaded: list[tuple[str, torch.Tensor]] = []

        def recording() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in staged:
                loaded.append((name, tensor))
                yield name, tensor

        try:
            self._reload(recording())
        except Exception as e:
            self._roll_back(e, {name for name, _ in loaded})
            raise
        if self.keep_previous:
            for name, tensor in loaded:
                self.previous[name] = tensor if owned else tensor.to("cpu", self.dtype, copy=True)

    def _reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from atlas_rl.compat import vllm_cpu

        self.target.reload(weights)
        vllm_cpu.refresh_tied_lm_head(self.target.model())
        self.target.reset_prefix_cache()

    def _roll_back(self, error: Exception, touched: set[str]) -> None:
        logger.error("atlas-rl: loading new weights failed (%s: %s); restoring the previous "
                     "weights", type(error).__name__, error)
        previous = dict(self.previous)
        # A tied head has no checkpoint tensor of its own: vLLM skips it on load.
        on_disk = set(self.spec or ()) - {"lm_head.weight"}
        uncovered = touched - set(previous) - on_disk - {"lm_head.weight"}
        try:
            if uncovered:
                raise RuntimeError(f"no previous value of {sorted(uncovered)[:3]} to restore "
                                   f"(AtlasConfig.sync_rollback is off, or the checkpoint is "
                                   f"not local safetensors)")
            _reset_layerwise_reload(self.target)

            def weights() -> Iterator[tuple[str, torch.Tensor]]:
                if on_disk:
                    yield from _checkpoint_tensors(self.model, skip=set(previous))
                yield from previous.items()

            self._reload(weights())
        except Exception as e:  # noqa: BLE001
            self.broken = (f"the engine could not restore its weights after a failed load "
                           f"({type(error).__name__}: {error}; restoring raised "
                           f"{type(e).__name__}: {e}): build a new AtlasRolloutEngine")
            raise EngineBrokenError(self.broken) from e


def free_reload_state_with(runner):
    """Have `runner`'s model freed with it. vLLM 0.32 keeps every loaded layer's reload
    state in a process-wide ``WeakKeyDictionary`` (`layerwise.LAYERWISE_INFO`) whose
    values come to hold their layers (a reload's wrapped weight loaders close over them),
    so the keys never die: a model that was loaded in this process outlives its engine
    (~0.8 GB for SmolLM2-135M in float32 once a sync reloaded it; an RL process that
    builds engines, or trainers, again and again runs out of memory). When `runner` is
    collected, its model's entries go, and the model with them. Returns the finalizer:
    calling it frees them now (`AtlasRolloutEngine.close`). Once per runner."""
    import weakref

    from atlas_rl.backends.vllm import hooks

    free = getattr(runner, "_atlas_free_reload_state", None)
    if free is None and not hooks.enabled():  # ATLAS_RL_COMPAT=off: vLLM as it is
        hooks.record("reload_state", "off (ATLAS_RL_COMPAT=off)")
        return lambda: None
    if free is None:
        free = weakref.finalize(runner, _forget_reload_state, runner.get_model())
        hooks.assign(runner, {"_atlas_free_reload_state": free}, key="reload_state")
        hooks.record("reload_state", "applied")
    return free


def _forget_reload_state(model) -> None:
    try:
        from vllm.model_executor.model_loader.reload import layerwise
    except ImportError:  # another vLLM: nothing of ours to undo
        return
    for layer in model.modules():
        layerwise.LAYERWISE_INFO.pop(layer, None)
        layerwise.LOADING_LAYERS.discard(layer)


def _reset_layerwise_reload(target) -> None:
    """Undo a reload that stopped midway (vLLM 0.32's layerwise reload): drop the loads
    buffered for unfinished layers, then let vLLM's own finalisation put those layers'
    kernel tensors back, so that the next ``reload_weights`` starts from a clean state."""
    from vllm.model_executor.model_loader.reload import layerwise

    from atlas_rl.backends.vllm import hooks

    model = target.model()
    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            info.loaded_weights.clear()
            hooks.assign(info, {"load_numel": 0}, key="layerwise_reset")
    layerwise.finalize_layerwise_reload(model, target.vllm_config.model_config)
