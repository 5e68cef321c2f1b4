"""`AtlasProposer` driven as vLLM's model runner drives it, without vLLM: for the GPU check
(the GPU machine has torch and Triton but no vLLM) and the device-path tests.

Each `ProposerHarness.step` is one decode step of a batch of requests: the last step's
drafts are verified (a seeded random prefix of each is accepted, then one new token), the
policy's hidden states at the sampled positions arrive on ``device`` in vLLM's layout (k + 1
rows for a request that had k draft tokens), the runner's step hook hands the proposer its
`StepContext`, ``propose`` is called with vLLM's arguments (host lists of sampled tokens,
the token ids as a numpy array), and the hook takes the drafts' q for the verifier. No policy runs: the hidden states are random, so
acceptance here says nothing; the harness measures what the proposer costs and checks what
it hands over."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import numpy as np
import torch

from atlas_rl.backends.vllm.proposer import AtlasProposer, StepContext
from atlas_rl.controller import AtlasController


class ProposerHarness:
    PROMPT = 8

    def __init__(self, speculator, batch: int, lookahead: int, hidden_size: int, vocab: int,
                 device="cpu", device_drafts: bool | None = None, max_model_len: int = 2048,
                 seed: int = 0):
        config = SimpleNamespace(
            speculative_config=SimpleNamespace(num_speculative_tokens=lookahead),
            model_config=SimpleNamespace(max_model_len=max_model_len,
                                         get_vocab_size=lambda: vocab))
        self.proposer = AtlasProposer(config)
        self.proposer.device_drafts = device_drafts
        # always: every step drafts the full lookahead (no cost model to learn first)
        self.controller = AtlasController(lookahead, [speculator.name], always=True, explore=0.0)
        self.proposer.attach({speculator.name: speculator}, self.controller)
        self.batch, self.hidden_size, self.vocab = batch, hidden_size, vocab
        self.device = torch.device(device)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.keys = [f"req-{i}" for i in range(batch)]
        self.token_ids = np.zeros((batch, max_model_len), dtype=np.int64)
        self.token_ids[:, :self.PROMPT] = self.rng.integers(0, vocab, (batch, self.PROMPT))
        self.num_tokens = np.full(batch, self.PROMPT, dtype=np.int64)
        self.drafts: list[list[int]] | None = None
        self.handed = None  # what the last propose returned (a list, or a device tensor)
        self.packed_q = None  # the drafts' q handed to the verifier (packed sparse), or None

    def _sampled(self) -> list[list[int]]:
        out = []
        for row in range(self.batch):
            draft = self.drafts[row] if self.drafts is not None else []
            accepted = int(self.rng.integers(0, len(draft) + 1)) if draft else 0
            out.append(list(draft[:accepted]) + [int(self.rng.integers(0, self.vocab))])
        return out

    def step(self, around=contextlib.nullcontext) -> float:
        """One decode step; returns the wall seconds of ``propose`` (the device work it
        issued waited for, so that it counts). ``around``: a context manager factory
        wrapped around the ``propose`` call alone (a probe of what it does)."""
        sampled = self._sampled()
        verified = None if self.drafts is None else [len(d) for d in self.drafts]
        rows = self.batch if verified is None else sum(k + 1 for k in verified)
        hidden = torch.randn(rows, self.hidden_size, generator=self.gen, device=self.device)
        for row, toks in enumerate(sampled):
            n = int(self.num_tokens[row])
            self.token_ids[row, n:n + len(toks)] = toks
            self.num_tokens[row] = n + len(toks)
        self.proposer.begin_step(StepContext(
            req_ids=list(self.keys), num_verified=verified, hidden=hidden,
            num_prompt_tokens=[self.PROMPT] * self.batch))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with around():
            handed = self.proposer.propose(sampled, self.num_tokens, self.token_ids)
            # the runner's step hook then takes the drafts' q for atlas-rl's verifier
            self.packed_q = self.proposer.take_last_packed_q()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.handed = handed
        # what vLLM's runner does with a device tensor later, on its own copy stream
        self.drafts = handed.tolist() if isinstance(handed, torch.Tensor) else handed
        return seconds
