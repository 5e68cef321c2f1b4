"""atlas-rl: adaptive, lossless speculative decoding for RL rollouts on vLLM."""

from atlas_rl.config import AtlasConfig
from atlas_rl.rollout import Completion, RolloutBatch

__version__ = "0.1.0"
__all__ = ["AtlasConfig", "AtlasRolloutEngine", "Completion", "RolloutBatch",
           "speculative_config"]


def __getattr__(name):
    # The engine imports vLLM (seconds); load it only when asked for.
    if name == "AtlasRolloutEngine":
        from atlas_rl.engine import AtlasRolloutEngine

        return AtlasRolloutEngine
    if name == "speculative_config":  # stock vLLM with atlas (the vLLM plugin)
        from atlas_rl.backends.vllm.plugin import speculative_config

        return speculative_config
    raise AttributeError(f"module 'atlas_rl' has no attribute {name!r}")
