"""Adapters from AtlasRolloutEngine to trainers (installed as atlas_rl.integrations).

They hold no speculation logic. TRL (GRPOTrainer / RLOOTrainer) and wandb adapters
live in ``trl/`` and ``wandb/`` here once written; today the engine is used directly
(see examples/quickstart.py)."""
