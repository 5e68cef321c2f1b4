"""Shared fixtures: the real model (fetched once into the cache), a tiny random Llama
for mechanics (head_dim 64: the CPU attention backend rejects 16), engine factories."""

from __future__ import annotations

import gc
import os
import shutil

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model_path() -> str:
    from atlas_rl.models import resolve_model

    return resolve_model(REAL_MODEL)


@pytest.fixture(scope="session")
def tiny_model_path(real_model_path, tmp_path_factory) -> str:
    """A 2-layer random Llama with the real tokenizer but no chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(real_model_path, name), out / name)
    return str(out)


def perturbed_policy(model_path: str, seed: int = 0, scale: float = 0.2):
    """The real policy in transformers (float32, eval) with Gaussian noise on its MLP
    weights (``scale`` x each weight's std): new weights whose greedy output differs from
    the checkpoint's, to push through sync_weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name and name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return model


@pytest.fixture(scope="module")
def make_engine():
    """Build engines once per (model, method, config) within a test module; they are
    dropped at the module's end, so that a long session does not run out of memory."""
    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    cache = {}

    def make(model, speculation="atlas", **config_kwargs):
        config_kwargs.setdefault("cpu_kv_cache_gib", 1)
        config_kwargs.setdefault("max_model_len", 1024)
        key = (model, speculation, tuple(sorted(config_kwargs.items())))
        if key not in cache:
            cache[key] = AtlasRolloutEngine(model, speculation=speculation,
                                            config=AtlasConfig(**config_kwargs))
        return cache[key]

    yield make
    cache.clear()
    gc.collect()


# What torch.distributed launchers and TRL's colocated vLLM leave in os.environ: a child
# process that inherits them tries to join (or bind) the parent's rendezvous.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
            "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def subprocess_env():
    """Environment for a child process: ours minus the distributed rendezvous variables,
    plus the given overrides."""

    def make(**extra):
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    return make


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
