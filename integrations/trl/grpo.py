"""`atlas-rl grpo --config recipes/<model>/<recipe>.yaml [--key value ...]`: GRPO with TRL,
rollouts through atlas-rl.

One YAML holds everything, parsed the TRL way (`TrlParser`; the command line overrides
the file): the script's own fields below, TRL's `GRPOConfig` fields, TRL's `ModelConfig`
fields (PEFT/LoRA), and `AtlasConfig` fields prefixed ``atlas_`` (e.g. ``atlas_max_lookahead``;
the prefix keeps them apart from TRL fields of the same name, like ``seed`` and ``dtype``).
Works under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing
from dataclasses import dataclass, field

from atlas_rl.config import AtlasConfig

logger = logging.getLogger(__name__)

ATLAS_PREFIX = "atlas_"


@dataclass
class GRPOScriptArguments:
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Policy: a known short name (atlas-rl models list) or a local transformers folder."})
    dataset: str = field(default="builtin:math", metadata={
        "help": "builtin:math (word problems with answers), builtin:code (stdlib function stubs), "
                "builtin:drift (code, then math from halfway; keep shuffle_dataset false), "
                "hf:NAME[:CONFIG][@SPLIT] (a hub dataset, e.g. hf:openai/gsm8k:main@train), or a "
                "JSONL file (.gz ok) with a 'prompt', 'question' or 'messages' field per line."})
    num_prompts: int = field(default=256, metadata={
        "help": "Prompts the builtin datasets build, or the first rows of a hub dataset "
                "(files: all lines)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["correctness", "answer_format"],
                                    metadata={"help": "Reward functions from atlas_rl.rewards: "
                                              "correctness, answer_format, brevity, plain_text."})
    speculation: str = field(default="atlas", metadata={
        "help": "atlas, none, vllm-ngram or vllm-suffix."})


def _arg_type(tp):
    # HfArgumentParser takes lists, not variable-length tuples
    if typing.get_origin(tp) is tuple:
        return list[typing.get_args(tp)[0]]
    return tp


def atlas_arguments_class():
    """AtlasConfig's fields with the ``atlas_`` prefix, as a dataclass for TrlParser."""
    hints = typing.get_type_hints(AtlasConfig)
    specs = []
    for f in dataclasses.fields(AtlasConfig):
        default = f.default
        if isinstance(default, tuple):
            specs.append((ATLAS_PREFIX + f.name, _arg_type(hints[f.name]),
                          field(default_factory=lambda d=default: list(d), metadata=f.metadata)))
        else:
            specs.append((ATLAS_PREFIX + f.name, _arg_type(hints[f.name]),
                          field(default=default, metadata=f.metadata)))
    return dataclasses.make_dataclass("AtlasArguments", specs)


def to_atlas_config(atlas_args) -> AtlasConfig:
    return AtlasConfig(**{f.name[len(ATLAS_PREFIX):]: getattr(atlas_args, f.name)
                          for f in dataclasses.fields(atlas_args)})


def build_parser():
    from trl import GRPOConfig, ModelConfig, TrlParser

    return TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, atlas_arguments_class()),
                     prog="atlas-rl grpo")


def build_dataset(script_args, chat_template: bool = True):
    """The prompts as a datasets.Dataset, in one form (TRL wants one per dataset): chat
    messages where the model's tokenizer has a chat template, plain text where it has
    none (a base model: message contents joined)."""
    from datasets import Dataset

    from atlas_rl import workloads

    name, n = script_args.dataset, script_args.num_prompts
    if name == "builtin:math":
        prompts = workloads.math_prompts(n, seed=0)
    elif name == "builtin:code":
        prompts = workloads.code_prompts(n, seed=0)
    elif name == "builtin:drift":
        prompts = workloads.code_prompts(n // 2, seed=0) + workloads.math_prompts(n - n // 2, seed=0)
    elif name.startswith("builtin:"):
        raise ValueError(f"unknown builtin dataset {name!r}: builtin:math, builtin:code or "
                         f"builtin:drift")
    elif name.startswith("hf:"):
        prompts = workloads.load_hub_dataset(name[3:], limit=n)
    else:
        prompts = workloads.load_prompt_file(name)
    kinds = {isinstance(p.prompt, str) for p in prompts}
    if not chat_template and False in kinds:
        logger.warning("atlas-rl grpo: the model's tokenizer has no chat template: chat "
                       "prompts are given as plain text (message contents joined)")
        prompts = [p if isinstance(p.prompt, str) else workloads.Prompt(
            "\n\n".join(m["content"] for m in p.prompt) + "\n", p.domain, p.answer)
            for p in prompts]
    elif len(kinds) > 1:
        # TRL wants one prompt form per dataset: chat-format the plain ones.
        prompts = [workloads.Prompt([{"role": "user", "content": p.prompt}], p.domain, p.answer)
                   if isinstance(p.prompt, str) else p for p in prompts]
    return Dataset.from_dict({"prompt": [p.prompt for p in prompts],
                              "answer": [p.answer for p in prompts],
                              "domain": [p.domain for p in prompts]})


def wants_deepspeed(argv) -> bool:
    """A DeepSpeed run: ``accelerate launch`` with a DeepSpeed config, ``--deepspeed`` on
    the command line, or a ``deepspeed:`` entry in the ``--config`` file."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return True
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in args):
        return True
    if "--config" in args[:-1]:
        import yaml

        with open(args[args.index("--config") + 1]) as f:
            return bool((yaml.safe_load(f) or {}).get("deepspeed"))
    return False


def parse(argv):
    parser = build_parser()
    if wants_deepspeed(argv):
        # accelerate's process state is built with the training arguments: the DeepSpeed
        # CPU fixes must be in place before (atlas_rl.compat.deepspeed).
        from atlas_rl.compat import deepspeed as ds_compat

        ds_compat.apply()
    script_args, training_args, model_args, atlas_args = parser.parse_args_and_config(argv)
    return script_args, training_args, model_args, to_atlas_config(atlas_args)


def size_kv_cache(atlas_config: AtlasConfig, training_args, model: str) -> AtlasConfig:
    """On a CPU, where the KV cache is a fixed size (`AtlasConfig.cpu_kv_cache_gib`, 2 GiB
    by default): what one generation batch needs (TRL generates
    ``generation_batch_size`` sequences of at most ``vllm_max_model_length`` tokens at
    once), unless the user chose (``atlas_cpu_kv_cache_gib``, VLLM_CPU_KVCACHE_SPACE) or a
    GPU runs it (vLLM sizes its cache there)."""
    default = next(f.default for f in dataclasses.fields(AtlasConfig)
                   if f.name == "cpu_kv_cache_gib")
    import torch

    if atlas_config.cpu_kv_cache_gib != default or os.environ.get("VLLM_CPU_KVCACHE_SPACE") \
            or torch.cuda.is_available():
        return atlas_config
    from atlas_rl.backends.vllm.engine import cpu_kv_cache_gib_for

    sequences = training_args.generation_batch_size or training_args.per_device_train_batch_size
    tokens = training_args.vllm_max_model_length or atlas_config.max_model_len
    dtype = atlas_config.dtype or ("bfloat16" if training_args.bf16 else "float32")
    gib = cpu_kv_cache_gib_for(model, dtype, [(sequences, tokens + atlas_config.max_lookahead)])
    logger.warning("atlas-rl grpo: KV cache %.2f GiB: %d sequences (generation_batch_size) "
                   "of at most %d tokens (vllm_max_model_length) in %s; "
                   "atlas_cpu_kv_cache_gib chooses", gib, sequences, tokens, dtype)
    return dataclasses.replace(atlas_config, cpu_kv_cache_gib=gib)


def main(argv=None) -> int:
    from atlas_rl.integrations.trl import AtlasGRPOTrainer
    from trl import get_peft_config

    from atlas_rl.models import resolve_model
    from atlas_rl.rewards import get_reward_funcs

    script_args, training_args, model_args, atlas_config = parse(argv)
    from transformers import AutoTokenizer

    model = resolve_model(model_args.model_name_or_path or script_args.model)
    dataset = build_dataset(script_args, chat_template=bool(
        getattr(AutoTokenizer.from_pretrained(model), "chat_template", None)))
    atlas_config = size_kv_cache(atlas_config, training_args, model)
    trainer = AtlasGRPOTrainer(
        model=model, reward_funcs=get_reward_funcs(script_args.reward_funcs),
        args=training_args, train_dataset=dataset, peft_config=get_peft_config(model_args),
        atlas_config=atlas_config, speculation=script_args.speculation)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return 0
