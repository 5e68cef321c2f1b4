"""DeepSpeed ZeRO on the CPU under accelerate / transformers / TRL: two version-gated,
self-checking fixes.

Call `apply()` at the top of a training script run by torchrun or ``accelerate launch``,
before ``GRPOConfig`` / ``TrainingArguments`` is built (building it sets up the process
group), with ``DS_ACCELERATOR=cpu`` (DeepSpeed's CPU accelerator; its collectives go
through gloo unless oneCCL's torch bindings are installed)::

    from atlas_rl.compat import deepspeed as ds_compat
    ds_compat.apply()
    args = GRPOConfig(deepspeed={"zero_optimization": {"stage": 3}, ...}, ...)

Where DeepSpeed drives a GPU, or where a release no longer has the problem, a fix does
nothing and says so in `status()`.

1. DeepSpeed's communication is not initialised when ``zero.Init`` needs it (DeepSpeed
   0.19, ``use_cpu=True``, ZeRO-3). transformers builds a ZeRO-3 model under
   ``deepspeed.zero.Init``, and TRL's ``GRPOTrainer`` does so in its ``__init__`` (from a
   model name) before the Trainer exists. ``Init.__init__``
   (deepspeed/runtime/zero/partition_parameters.py) first builds ``DeepSpeedConfig``,
   which takes the world size from ``deepspeed.comm`` (1 when it is not initialised) and
   checks the batch sizes against it, and only then calls ``init_distributed()``. On GPUs
   accelerate has initialised ``deepspeed.comm`` by then; on the CPU with ``use_cpu=True``
   accelerate takes its MULTI_CPU path and initialises torch.distributed directly, so
   every ZeRO-3 model fails to build: ``train_batch_size is not equal to
   micro_batch_per_gpu * gradient_acc_step * world_size 16 != 8 * 1 * 1``.
   The fix initialises ``deepspeed.comm`` (over the process group accelerate made, or a
   new one with DeepSpeed's CPU backend: what accelerate does on GPUs).
   Self-check: a ``zero.Init`` for the launch's world size is constructed (not entered);
   the fix runs only if that fails on the batch check, and is kept only if it then
   succeeds and ``deepspeed.comm`` counts every rank.

2. accelerate counts one process per rank under DeepSpeed on the CPU (accelerate 1.15,
   ``use_cpu=False``, e.g. ``accelerate launch`` with a DeepSpeed config and a script that
   leaves ``use_cpu`` alone). ``TrainingArguments(deepspeed=...)`` builds
   ``accelerate.PartialState`` with ``ACCELERATE_USE_DEEPSPEED=true`` and no backend.
   ``PartialState._prepare_backend`` (accelerate/state.py) picks a backend only for an
   accelerator it knows (CUDA, XPU, NPU, ...) or for ``cpu=True``, so it returns
   ``(None, NO)``; ``PartialState.__init__`` still initialises ``deepspeed.comm`` (two
   ranks) but then, seeing no backend, sets ``num_processes = 1, process_index = 0`` on
   every rank before switching to DEEPSPEED. Every rank then believes it is rank 0 of 1:
   the "auto" batch sizes are computed for one process, DeepSpeed (which sees two)
   rejects them, data is not sharded, every rank acts as the main process.
   The fix: when ``_prepare_backend`` finds no backend for a DeepSpeed launch
   (``LOCAL_RANK`` set, ``ACCELERATE_USE_DEEPSPEED=true``, ``cpu=False``) and DeepSpeed's
   accelerator is the CPU, it returns DeepSpeed's CPU backend and ``MULTI_CPU``: the pair
   accelerate itself uses for CPU training. ``PartialState.__init__`` then counts the ranks
   from torch.distributed, sets the CPU device, and switches to DEEPSPEED as before.
   Self-check: ``_prepare_backend`` is called on a bare ``PartialState`` in the
   environment of a DeepSpeed launch; the fix is installed only if it returns no backend,
   and kept only if the patched method then returns the CPU backend.

Switch both off with ``ATLAS_RL_COMPAT=off`` (as the vLLM fixes). The assignment into
accelerate goes through this module's seam (`SEAM`, `atlas_rl.seam`), whose table is below.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager

from atlas_rl.seam import Hook, Seam, compat_enabled, hook_of, minor_version

logger = logging.getLogger(__name__)

# Releases where each problem was seen. Outside these ranges the self-checks still run: a
# fix is applied only where its check shows the problem (with a warning outside them).
_AFFECTED_DEEPSPEED = ((0, 19), (0, 19))
_AFFECTED_ACCELERATE = ((1, 15), (1, 15))

SEAM = Seam("accelerate/DeepSpeed", (
    Hook("accelerate_cpu_backend", "accelerate.state.PartialState._prepare_backend",
         "workaround", "DeepSpeed launches on the CPU (use_cpu=False)",
         "no backend for a CPU DeepSpeed launch: every rank counts itself rank 0 of 1",
         "self-check finds a backend: nothing replaced"),
    Hook("deepspeed_comm", "deepspeed.init_distributed (a call, no assignment)",
         "workaround", "ZeRO-3 on the CPU (use_cpu=True)",
         "zero.Init checks batch sizes against deepspeed.comm before initialising it",
         "self-check builds zero.Init fine: nothing done"),
))
enabled = compat_enabled


def _keep(key: str, state: str) -> str:
    """`state` unless the fix already recorded one in this process."""
    return SEAM.status().get(key) or SEAM.record(key, state)


def status() -> dict[str, str]:
    """What each fix did in this process: 'applied', 'not needed: ...', 'off', ..."""
    return SEAM.status()


_version = minor_version


def _ds_cpu_backend() -> str | None:
    """DeepSpeed's communication backend when its accelerator is the CPU, else None.
    Raises ImportError without DeepSpeed."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return None
    return accelerator.communication_backend_name()


def _precondition(key: str) -> str | None:
    """The DeepSpeed CPU backend, or None after recording why the fix does not apply."""
    if not enabled():
        SEAM.record(key, "off (ATLAS_RL_COMPAT=off)")
        return None
    try:
        backend = _ds_cpu_backend()
    except ImportError:
        SEAM.record(key, "not needed: deepspeed is not installed")
        return None
    if backend is None:
        SEAM.record(key, "not needed: DeepSpeed's accelerator is not the CPU")
    return backend


# --- 1. deepspeed.comm before zero.Init --------------------------------------------

def _zero_init_error(world_size: int) -> AssertionError | None:
    """Construct (do not enter) a ZeRO-3 ``zero.Init`` for `world_size` ranks, as
    transformers' from_pretrained does: its batch check fails while deepspeed.comm
    counts one rank."""
    import deepspeed

    config = {"train_batch_size": world_size, "train_micro_batch_size_per_gpu": 1,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    try:
        deepspeed.zero.Init(config_dict_or_path=config)
    except AssertionError as error:
        if "train_batch_size" not in str(error):
            raise
        return error
    return None


def init_comm_for_zero_init() -> str:
    """Apply fix 1 if DeepSpeed needs it here: initialise deepspeed.comm on a CPU launch
    of several processes. Call before the trainer (and its model) is built."""
    key = "deepspeed_comm"
    backend = _precondition(key)
    if backend is None:
        return SEAM.status()[key]
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    world = (dist.get_world_size() if dist.is_initialized()
             else int(os.environ.get("WORLD_SIZE", "1")))
    if world <= 1:
        SEAM.record(key, "not needed: a single process")
        return SEAM.status()[key]
    if ds_dist.is_initialized():
        return _keep(key, "not needed: deepspeed.comm is initialised")
    if _zero_init_error(world) is None:
        SEAM.record(key, (f"not needed: DeepSpeed {deepspeed.__version__} initialises its "
                        f"comm before zero.Init checks the batch sizes"))
        return SEAM.status()[key]
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    error = _zero_init_error(world)
    if error is not None or ds_dist.get_world_size() != world:
        raise RuntimeError(
            f"atlas-rl's fix for DeepSpeed {deepspeed.__version__} on the CPU did not take "
            f"effect (deepspeed.comm counts {ds_dist.get_world_size()} of {world} ranks; "
            f"{error}): a ZeRO-3 model cannot be built")
    if not _AFFECTED_DEEPSPEED[0] <= _version(deepspeed) <= _AFFECTED_DEEPSPEED[1]:
        logger.warning("DeepSpeed %s still builds zero.Init's config before its comm; "
                       "atlas-rl initialised the comm", deepspeed.__version__)
    SEAM.record(key, "applied")
    logger.info("atlas-rl: deepspeed.comm initialised (%s, %d ranks) for zero.Init",
                backend, world)
    return SEAM.status()[key]


# --- 2. accelerate's missing CPU backend under DeepSpeed ---------------------------

@contextmanager
def _deepspeed_launch_env():
    """The environment `PartialState` sees on a rank of a DeepSpeed launch (torchrun /
    accelerate launch set LOCAL_RANK; TrainingArguments sets ACCELERATE_USE_DEEPSPEED)."""
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED")}
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _backend_of_deepspeed_launch(prepare_backend) -> tuple:
    from accelerate.state import PartialState

    bare = object.__new__(PartialState)  # _prepare_backend reads no instance state
    with _deepspeed_launch_env():
        return prepare_backend(bare, False, False, None)


def fix_accelerate_cpu_backend() -> str:
    """Apply fix 2 if the running accelerate needs it. Call before TrainingArguments (or
    ``accelerate.PartialState``) is built."""
    key = "accelerate_cpu_backend"
    backend = _precondition(key)
    if backend is None:
        return SEAM.status()[key]
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    prepare = PartialState._prepare_backend
    if hook_of(prepare) == key:
        return _keep(key, "applied")
    found, _ = _backend_of_deepspeed_launch(prepare)
    if found is not None:
        SEAM.record(key, (f"not needed: accelerate {accelerate.__version__} picks backend "
                        f"{found!r} for DeepSpeed here"))
        return SEAM.status()[key]

    @functools.wraps(prepare)
    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, distributed_type = prepare(self, cpu, sagemaker_dp, backend)
        if (found is None and not cpu and not sagemaker_dp
                and int(os.environ.get("LOCAL_RANK", "-1")) != -1
                and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
            ds_backend = _ds_cpu_backend()
            if ds_backend is not None:
                return ds_backend, DistributedType.MULTI_CPU
        return found, distributed_type

    SEAM.patch(PartialState, "_prepare_backend", _prepare_backend, key=key)
    fixed, distributed_type = _backend_of_deepspeed_launch(PartialState._prepare_backend)
    if fixed != backend or distributed_type != DistributedType.MULTI_CPU:
        SEAM.assign(PartialState, {"_prepare_backend": prepare}, key=key)
        raise RuntimeError(
            f"atlas-rl's fix for accelerate {accelerate.__version__} under DeepSpeed on the "
            f"CPU did not take effect (backend {fixed!r}, {distributed_type}): every rank "
            f"would count itself as rank 0 of 1")
    if not _AFFECTED_ACCELERATE[0] <= _version(accelerate) <= _AFFECTED_ACCELERATE[1]:
        logger.warning("accelerate %s still gives DeepSpeed no CPU backend; atlas-rl fixed it",
                       accelerate.__version__)
    SEAM.record(key, "applied")
    logger.info("atlas-rl: accelerate's DeepSpeed launches on the CPU use backend %r", backend)
    return SEAM.status()[key]


def check_state() -> None:
    """Raise if accelerate's process state was built without fix 2 (every rank counting
    itself rank 0 of 1 under DeepSpeed): `apply()` came after TrainingArguments."""
    from accelerate.state import PartialState

    if not PartialState._shared_state:
        return
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    state = PartialState()
    if (state.distributed_type == DistributedType.DEEPSPEED and dist.is_initialized()
            and state.num_processes != dist.get_world_size()):
        raise RuntimeError(
            f"accelerate counts {state.num_processes} process(es) under DeepSpeed but "
            f"torch.distributed has {dist.get_world_size()}: call "
            f"atlas_rl.compat.deepspeed.apply() before building GRPOConfig/TrainingArguments")


def apply() -> dict[str, str]:
    """Both fixes (version-gated, self-checking); returns `status()`. Call before
    GRPOConfig / TrainingArguments is built, in every process of the launch."""
    fix_accelerate_cpu_backend()
    init_comm_for_zero_init()
    check_state()
    return status()
