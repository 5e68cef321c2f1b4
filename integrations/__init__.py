"""Adapters from AtlasRolloutEngine to trainers (installed as atlas_rl.integrations).

They hold no speculation logic. ``trl``: TRL's GRPOTrainer / RLOOTrainer drop-in
(``enable_atlas()``, ``AtlasGRPOTrainer``, ``AtlasRLOOTrainer``)."""
