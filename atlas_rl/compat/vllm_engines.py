"""A fix for several vLLM engines in one process (every platform), version-gated and
self-checking like the CPU fixes (`atlas_rl.compat.vllm_cpu`).

The parallel state torn down by the first engine to shut down (vLLM 0.32). Engines
built in one process (``vllm.LLM`` without a separate engine-core process: the
benchmark's peers, a TRL trainer's colocated engine beside one of atlas-rl's, tests)
share vLLM's process-wide parallel groups: the second engine finds them initialised and
joins them. ``EngineCore.shutdown`` ends with ``cleanup_dist_env_and_memory()``, which
destroys them whichever engine is left, so closing or dropping one engine broke every
other at its next step ("pipeline model parallel group is not initialized"). We keep a
weak set of the engine cores built in this process that have not shut down; while
another one lives, a shutdown leaves the shared groups in place (it still frees its own
engine's resources), and the last one tears them down as vLLM does.

Off with ``ATLAS_RL_COMPAT=off`` like every workaround (`hooks.enabled`).
"""

from __future__ import annotations

import gc
import inspect
import logging
import weakref

from atlas_rl.backends.vllm import hooks

logger = logging.getLogger(__name__)

KEY = "shared_parallel_state"

#: In-process engine cores built and not yet shut down.
_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def live_engine_cores() -> int:
    """How many engine cores of this process are built and not shut down."""
    return len(_LIVE)


def fix_shared_parallel_state() -> str:
    """Apply the fix (before building an engine): the shared parallel groups are torn
    down by the last in-process engine core to shut down, not the first."""
    if not hooks.enabled():
        return hooks.record(KEY, f"off ({hooks.ENV}=off)")
    from vllm.v1.engine import core as core_module

    engine_core = core_module.EngineCore
    if hooks.hook_of(core_module.cleanup_dist_env_and_memory) == KEY:
        return hooks.status()[KEY]
    try:
        tears_down = "cleanup_dist_env_and_memory" in inspect.getsource(engine_core.shutdown)
    except (OSError, TypeError):
        tears_down = False
    if not tears_down:
        return hooks.record(KEY, "not needed: EngineCore.shutdown does not tear down the "
                                 "parallel state")
    cleanup = core_module.cleanup_dist_env_and_memory
    init, shutdown = engine_core.__init__, engine_core.shutdown

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _LIVE.add(self)

    def shutdown_core(self, *args, **kwargs):
        _LIVE.discard(self)
        return shutdown(self, *args, **kwargs)

    def cleanup_when_last(*args, **kwargs):
        if _LIVE:  # another engine of this process still uses the groups
            logger.debug("atlas-rl: an engine shut down; %d other in-process engine(s) keep "
                         "vLLM's parallel state", len(_LIVE))
            gc.collect()
            return None
        return cleanup(*args, **kwargs)

    hooks.patch(engine_core, "__init__", __init__, key=KEY)
    hooks.patch(engine_core, "shutdown", shutdown_core, key=KEY)
    hooks.patch(core_module, "cleanup_dist_env_and_memory", cleanup_when_last, key=KEY)
    return hooks.record(KEY, "applied")
