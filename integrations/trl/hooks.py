"""The seam into TRL: every assignment into a TRL object goes through `SEAM`
(`atlas_rl.seam`) under the key of a row of this table.

========================  =========================================================
key                       target (TRL 1.16)
========================  =========================================================
init_vllm                 VLLMGeneration._init_vllm: build the engine with our config
vllm_llm                  trl.generation.vllm_generation.LLM, swapped during _init_vllm
engine_handle             VLLMGeneration.atlas_engine (the user's handle on the engine)
sync_weights              VLLMGeneration.sync_weights: TRL's iterator -> engine.sync_weights
generate                  VLLMGeneration.generate: the batch's stats and sequences
generate_single_turn      {GRPO,RLOO}Trainer._generate_single_turn: learn + atlas/* metrics
save_checkpoint           {GRPO,RLOO}Trainer._save_checkpoint: + checkpoint-N/atlas/
load_optimizer_and_sched  {GRPO,RLOO}Trainer._load_optimizer_and_scheduler: resume it
client_auth               VLLMClient.check_server: the session sends the API key
client_init_communicator  VLLMClient.init_communicator: atlas_files handshake (CPU server)
client_update_params      VLLMClient.update_named_params: weights as files (CPU server)
========================  =========================================================
"""

from __future__ import annotations

from atlas_rl.seam import Hook, Seam

_WHEN = "checked at enable_atlas: a TRL outside 1.16 is refused with the fix"
_GEN, _TRAINERS = "VLLMGeneration", "{GRPO,RLOO}Trainer"
# key, target, scope, why (kind "wiring" for all; what happens when TRL changes: _WHEN)
_TABLE = (
    ("init_vllm", f"{_GEN}._init_vllm", "colocate mode",
     "build TRL's engine with atlas-rl's speculative config and adopt it"),
    ("vllm_llm", "trl.generation.vllm_generation.LLM", "during _init_vllm",
     "TRL calls vllm.LLM by this name: build_llm takes its place, then it is restored"),
    ("engine_handle", f"{_GEN}.atlas_engine", "colocate mode",
     "the user's handle on the AtlasRolloutEngine"),
    ("sync_weights", f"{_GEN}.sync_weights", "colocate mode",
     "a LoRA model on one process -> engine.sync_weights (merged there); else TRL's "
     "parameter iterator (ZeRO-3 gathers, merged adapters) -> engine.sync_weights, "
     "checked and all or nothing; TRL's own path fails on vLLM's CPU backend"),
    ("generate", f"{_GEN}.generate", "colocate mode",
     "the batch's speculation stats and token sequences"),
    ("generate_single_turn", f"{_TRAINERS}._generate_single_turn", "trainers",
     "engine.learn after every generation, atlas/* into the trainer's metrics"),
    ("save_checkpoint", f"{_TRAINERS}._save_checkpoint", "trainers",
     "the speculator's state in checkpoint-N/atlas/"),
    ("load_optimizer_and_scheduler", f"{_TRAINERS}._load_optimizer_and_scheduler", "trainers",
     "resume_from_checkpoint restores the speculator's state"),
    ("client_auth", "VLLMClient.check_server", "server mode",
     "the session sends the server's API key (TRL's client has no key argument)"),
    ("client_init_communicator", "VLLMClient.init_communicator", "server mode",
     "an atlas_files server: handshake through the shared directory, not NCCL"),
    ("client_update_params", "VLLMClient.update_named_params", "server mode",
     "an atlas_files server: weights as files; otherwise TRL's NCCL broadcast"),
)
SEAM = Seam("TRL", tuple(Hook(key, target, "wiring", scope, why, _WHEN)
                         for key, target, scope, why in _TABLE))
