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


# Engines a module's `make_engine` keeps alive at once (~1.4 GB each with the real model
# in float32: 0.5 GiB of KV cache, the weights, vLLM's buffers). The least recently used one
# is dropped when another is built; a test or fixture that still holds it keeps it. One:
# the modules that use two engines at once hold them in fixtures, and test_exactness, the
# suite's peak, builds each of its engines for a run of consecutive tests.
MAX_CACHED_ENGINES = int(os.environ.get("ATLAS_RL_TEST_MAX_ENGINES", "1"))


def release_memory() -> None:
    """Collect what was dropped and hand the freed heap back to the OS (glibc keeps it
    otherwise, and the process's RSS never falls). Twice: a collected model runner's
    finalizer (`weight_sync.free_reload_state_with`) unties its model from vLLM's reload
    state during the first collection, and the model goes in the second."""
    import ctypes

    gc.collect()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module(request):
    """What a module dropped is collected and handed back to the OS at the module's end,
    not whenever the next module's engine fixture happens to (glibc keeps freed heap
    otherwise): the suite's peak stays bounded wherever the modules it runs sit."""
    yield
    release_memory()
    if _memory_log is not None:
        _memory_log.module_end(request.node.nodeid)


@pytest.fixture(scope="module")
def make_engine():
    """Build engines once per (model, method, config) within a test module, at most
    `MAX_CACHED_ENGINES` kept at once (the least recently used is dropped); the rest are
    dropped at the module's end, so that the suite's memory stays bounded (the heaviest
    module's peak RSS in its own process, `make test`'s way: 4.5 GiB on 2026-12-03; the
    whole suite in one process peaked at 11.0 GiB before vLLM's reload table was untied
    from freed engines, 9.6 GiB after)."""
    from collections import OrderedDict

    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    cache: OrderedDict = OrderedDict()

    def make(model, speculation="atlas", **config_kwargs):
        config_kwargs.setdefault("cpu_kv_cache_gib", 0.5)
        config_kwargs.setdefault("max_model_len", 1024)
        key = (model, speculation, tuple(sorted(config_kwargs.items())))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        while len(cache) >= max(1, MAX_CACHED_ENGINES):
            cache.popitem(last=False)
            release_memory()
        cache[key] = AtlasRolloutEngine(model, speculation=speculation,
                                        config=AtlasConfig(**config_kwargs))
        return cache[key]

    yield make
    cache.clear()
    release_memory()


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


class _MemoryLog:
    """With ATLAS_RL_TEST_MEMORY_LOG=FILE: one line per test, the pytest process's RSS at
    its end and the machine's least available memory while it ran (child processes, the
    servers and multiprocess engines, included), to find the test that brings the suite
    near the OOM killer."""

    def __init__(self, path: str):
        import threading

        self.path, self.low = path, float("inf")
        threading.Thread(target=self._watch, daemon=True).start()

    @staticmethod
    def available_gib() -> float:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return kib / 2**20

    def _watch(self) -> None:
        import time

        while True:
            self.low = min(self.low, self.available_gib())
            time.sleep(0.25)

    def write(self, nodeid: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{_rss_gib():6.2f} GiB rss  {self.low:6.2f} GiB least available  {nodeid}\n")
        self.low = self.available_gib()

    def module_end(self, nodeid: str) -> None:
        """After the module's release: what it left behind, and the engines still alive
        (a module that raises the floor names its leftovers here)."""
        import torch

        alive, storages = [], {}
        for o in gc.get_objects():
            if type(o).__name__ in ("AtlasRolloutEngine", "LLM", "EngineCore"):
                alive.append(type(o).__name__)
            elif isinstance(o, torch.Tensor) and o.device.type == "cpu":
                try:  # meta, sparse, fake (torch.compile's): no storage to count
                    st = o.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
                except (RuntimeError, NotImplementedError):
                    continue
        with open(self.path, "a") as f:
            f.write(f"{_rss_gib():6.2f} GiB rss after the module's release, engines alive: "
                    f"{alive or 'none'}, tensors alive: {sum(storages.values()) / 2**30:.2f} "
                    f"GiB  {nodeid}\n")


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


_memory_log = (_MemoryLog(os.environ["ATLAS_RL_TEST_MEMORY_LOG"])
               if os.environ.get("ATLAS_RL_TEST_MEMORY_LOG") else None)


def pytest_runtest_logfinish(nodeid, location):
    if _memory_log is not None:
        _memory_log.write(nodeid)


def pytest_terminal_summary(terminalreporter):
    """The pytest process's peak resident memory (VmHWM; engines in child processes, the
    servers and multiprocess engines, are not in it): the suite must leave room beside it."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return
    terminalreporter.write_line(f"atlas-rl: peak RSS of this pytest process: {peak / 2**20:.2f} GiB")
