"""atlas-rl as a vLLM plugin: the entry point ``atlas_rl`` in the group
``vllm.general_plugins`` (pyproject.toml), which vLLM loads in every process it starts
(the API server, the engine core, every worker; Ray workers where atlas-rl is installed).

With it, stock vLLM speculates with atlas from a config alone::

    vllm serve MODEL --speculative-config "$(atlas-rl speculative-config)"
    vllm.LLM(MODEL, speculative_config=atlas_rl.speculative_config())

The speculative config names atlas's proposer (``method: custom_class``) and carries
atlas's fields under ``"atlas"`` (any `AtlasConfig` field plus ``speculation``,
``state_dir``, ``learn_every``: `worker.SERVING_FIELDS`). What `register` installs (seam
rows ``atlas_config`` and ``atlas_worker``, `hooks`):

- where an engine config is built, the atlas fields are checked (an unknown or ill-typed
  field stops the build with the valid fields listed) and moved into
  ``additional_config["atlas_rl"]``, which vLLM hands to every worker;
- in each worker, once the runner has loaded the model, atlas's proposer sets itself up
  from them (`worker.setup_in_worker`).

A config without ``"atlas"`` changes nothing (the in-process `AtlasRolloutEngine`
attaches its own speculators; other servers run stock). Outside the vLLM versions the
hooks were written for, the plugin says so once and installs nothing.
"""

from __future__ import annotations

import json
import logging
import os

from atlas_rl.backends.vllm.hooks import PROPOSER_CLASS

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """vLLM's entry point (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from atlas_rl.backends.vllm import hooks
    except ImportError:  # vLLM without what atlas-rl needs: leave it untouched
        return
    if not hooks.tested_version():
        version = ".".join(map(str, hooks.vllm_version()))
        supported = " to ".join(".".join(map(str, v)) for v in hooks.TESTED)
        logger.warning("atlas-rl: vLLM %s is outside the versions atlas-rl supports (%s); "
                       "the atlas-rl plugin leaves this vLLM untouched", version, supported)
        return
    _install_config_hook(hooks)
    _install_worker_hook(hooks)
    _install_sleep_hook(hooks)
    from atlas_rl.backends.vllm.sampler import fail_nonfinite_requests

    fail_nonfinite_requests()  # the scheduler, wherever vLLM runs it
    from atlas_rl.backends.vllm.weight_transfer import register_backend

    register_backend()
    hooks.record("weight_transfer", "applied")


def speculative_config(speculation: str = "atlas", state_dir: str | None = None,
                       learn_every: int | None = None, auto_learn: bool | None = None,
                       **atlas_config) -> dict:
    """The speculative config that makes stock vLLM speculate with atlas (the plugin
    must be installed: ``pip install atlas-rl``); `atlas_config`: AtlasConfig fields."""
    from atlas_rl.backends.vllm.worker import parse_atlas_fields
    from atlas_rl.config import AtlasConfig

    fields = dict(atlas_config, speculation=speculation)
    if state_dir is not None:
        fields["state_dir"] = str(state_dir)
    if learn_every is not None:
        fields["learn_every"] = learn_every
    if auto_learn is not None:
        fields["auto_learn"] = auto_learn
    parse_atlas_fields(fields)  # refuse bad values here, not in a worker
    k = atlas_config.get("max_lookahead", AtlasConfig.max_lookahead)
    return {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": k,
            "atlas": fields}


def move_atlas_fields(engine_args) -> bool:
    """If `engine_args.speculative_config` carries atlas fields: check them, move them to
    ``additional_config["atlas_rl"]`` and complete vLLM's part. True if it did."""
    from atlas_rl.backends.vllm.worker import ADDITIONAL_CONFIG_KEY, parse_atlas_fields

    spec = engine_args.speculative_config
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            return False
    if not isinstance(spec, dict) or "atlas" not in spec:
        return False
    spec = dict(spec)
    fields = parse_atlas_fields(spec.pop("atlas"))
    method, model = spec.setdefault("method", "custom_class"), spec.setdefault("model", PROPOSER_CLASS)
    if method != "custom_class" or model != PROPOSER_CLASS:
        raise ValueError(f"a speculative config with 'atlas' fields must use method "
                         f"'custom_class' and model {PROPOSER_CLASS!r}, got method {method!r}, "
                         f"model {model!r}: drop those two keys (`atlas-rl speculative-config` "
                         f"writes the config)")
    spec.setdefault("num_speculative_tokens", fields["config"]["max_lookahead"])
    if fields["config"]["max_lookahead"] > spec["num_speculative_tokens"]:
        raise ValueError(f"atlas max_lookahead {fields['config']['max_lookahead']} exceeds "
                         f"num_speculative_tokens {spec['num_speculative_tokens']}: raise "
                         f"num_speculative_tokens or lower max_lookahead")
    if fields["metrics_file"] is None:  # the worker writes, this process serves /metrics
        import tempfile

        from atlas_rl.backends.vllm.server_metrics import register_collector

        handle, path = tempfile.mkstemp(prefix="atlas-rl-metrics-", suffix=".json")
        os.close(handle)
        os.unlink(path)
        fields["metrics_file"] = path
        register_collector(path)
    from atlas_rl.backends.vllm import hooks

    extra = engine_args.additional_config
    extra = dict(extra) if isinstance(extra, dict) else {}
    extra[ADDITIONAL_CONFIG_KEY] = fields
    values = {"speculative_config": spec, "additional_config": extra}
    if not getattr(engine_args, "worker_extension_cls", ""):  # RPC by name (remote.py)
        from atlas_rl.backends.vllm.remote import EXTENSION_CLASS

        values["worker_extension_cls"] = EXTENSION_CLASS
    hooks.assign(engine_args, values, key="atlas_config")
    return True


def configure_weight_transfer(engine_args, atlas: bool) -> str | None:
    """Weight transfer where vLLM runs on the CPU: NCCL cannot run there, so a server that
    speculates with atlas (`atlas`) and was asked for ``nccl`` (what ``trl vllm-serve``
    passes) gets atlas-rl's ``atlas_files`` backend instead, and ``atlas_files`` gets a
    transfer directory if none was named. Returns the backend (None: no weight transfer).
    GPU servers are left as they are."""
    from atlas_rl.backends.vllm import hooks
    from atlas_rl.backends.vllm import weight_transfer as wt

    config = engine_args.weight_transfer_config
    if config is None:
        return None
    backend = config.get("backend", "nccl") if isinstance(config, dict) else config.backend
    if backend == "nccl" and atlas and _on_cpu():
        logger.warning("atlas-rl: vLLM runs on the CPU, where NCCL cannot: weight transfer "
                       "uses atlas-rl's %r backend (files in a shared directory) instead",
                       wt.BACKEND)
        backend = wt.BACKEND
        import dataclasses

        replaced = dict(config, backend=backend) if isinstance(config, dict) else \
            dataclasses.replace(config, backend=backend)
        hooks.assign(engine_args, {"weight_transfer_config": replaced}, key="weight_transfer")
    if backend == wt.BACKEND:
        extra = engine_args.additional_config
        extra = dict(extra) if isinstance(extra, dict) else {}
        if not (extra.get(wt.CONFIG_KEY) or {}).get("directory"):
            # made here, in the process that builds the engine config (`vllm serve`'s API
            # server; `LLM`'s caller), which owns it: removed when that process exits, or
            # by the next server's start if it was killed (`wt.default_directory`)
            extra[wt.CONFIG_KEY] = {"directory": wt.default_directory()}
            hooks.assign(engine_args, {"additional_config": extra}, key="weight_transfer")
    return backend


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _install_config_hook(hooks) -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        atlas = move_atlas_fields(self)
        configure_weight_transfer(self, atlas)
        return original(self, *args, **kwargs)

    if hooks.patch(EngineArgs, "create_engine_config", create_engine_config, key="atlas_config"):
        hooks.record("atlas_config", "applied")


def _install_worker_hook(hooks) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in classes:
        if "load_model" not in vars(cls):
            continue
        original = vars(cls)["load_model"]

        def load_model(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            _setup_proposer(self)
            return out

        hooks.patch(cls, "load_model", load_model, key="atlas_worker")
    hooks.record("atlas_worker", "applied")


def _install_sleep_hook(hooks) -> None:
    """Sleep mode (GPUs: vLLM refuses it on a CPU, `engine.build_llm` says why): level 2
    discards the device memory of everything allocated while the model loaded, the
    drafters' weights included; an atlas proposer keeps its drafters on the host across
    the sleep and puts them back at wake-up (`AtlasProposer.before_sleep`, `after_wake`)."""
    from vllm.v1.worker.gpu_worker import Worker

    classes = [Worker]
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker

        classes.append(CPUWorker)
    except ImportError:
        pass
    for cls in classes:
        if "sleep" not in vars(cls) or "wake_up" not in vars(cls):
            continue

        def sleep(self, level: int = 1, _original=vars(cls)["sleep"]):
            proposer = _atlas_proposer(self)
            if proposer is not None:
                proposer.before_sleep(level)
            return _original(self, level)

        def wake_up(self, tags=None, _original=vars(cls)["wake_up"]):
            out = _original(self, tags)
            proposer = _atlas_proposer(self)
            if proposer is not None:
                proposer.after_wake(tags)
            return out

        hooks.patch(cls, "sleep", sleep, key="sleep_mode")
        hooks.patch(cls, "wake_up", wake_up, key="sleep_mode")
    hooks.record("sleep_mode", "applied")


def _atlas_proposer(worker):
    from atlas_rl.backends.vllm.proposer import AtlasProposer

    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return drafter if isinstance(drafter, AtlasProposer) else None


def _setup_proposer(runner) -> None:
    from atlas_rl.backends.vllm.proposer import AtlasProposer
    from atlas_rl.backends.vllm.worker import setup_in_worker

    drafter = getattr(runner, "drafter", None)
    if isinstance(drafter, AtlasProposer):
        from atlas_rl.backends.vllm.weight_sync import free_reload_state_with

        free_reload_state_with(runner)
        setup_in_worker(runner, drafter)
