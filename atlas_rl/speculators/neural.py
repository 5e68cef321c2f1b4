"""A small neural drafter that reads the policy's own last hidden state.

Architecture (one residual MLP block, in the spirit of EAGLE's feature-level drafting,
sized for a CPU): the policy's final (normed) hidden state h_t at the position that
produced token x_{t+1}, and the policy's embedding of x_{t+1}, predict the next hidden
state; the policy's own LM head, restricted to a draft vocabulary of the most frequent
tokens, turns it into a distribution q over x_{t+2}:

    z = h_t + W_out silu(W_in [h_t ; E x_{t+1}])        y = rmsnorm(z) * g
    q = softmax(y W_S^T)                                 (W_S: LM head rows of the draft vocab)

Further draft positions feed (y, drafted token) back in. The embedding E and head W are
the target's tensors (handed over by vLLM's ``load_model``; updated in place by weight
syncs), so the drafter owns only W_in, W_out and g: ~1M parameters for a 576-wide model.
Per draft token and request it costs ~3.4M multiply-adds (mostly the 4,096-row head),
against ~135M for a SmolLM2-135M forward.

Training is distillation from the policy's own distribution: every target hidden state
h_{t+1} gives p = softmax(h_{t+1} W^T), so the loss is the cross-entropy of q against p
restricted to the draft vocabulary (the best q with that support). The inputs come for
free during generation: vLLM hands the proposer the hidden states at the positions it
sampled from, and we keep them per request (``observe``). Offline, ``train_static``
computes them with transformers (`atlas-rl train-speculator`).

Drafting from a distribution: with ``sample=True`` a draft token is sampled from q and q
goes to the verifier (accepted with probability 1 - TV(p, q)); otherwise the draft is
q's argmax, one-hot (accepted with probability p(x)).

Devices: the drafter lives where the policy's embedding does (``attach_target``). On CUDA
with a bf16 policy it drafts with bf16 matmuls (softmax and sampling in float32) and
trains with float32 weights under bf16 autocast; on the CPU everything is float32. The
drafting step waits for the device once per `propose` call: the Draft contract hands
tokens and confidences back as Python lists (docs/gpu.md lists the host syncs).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atlas_rl.kernels.staging import to_device
from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, Speculator


#: Static drafters shipped with atlas-rl, by model short name (`atlas-rl models`).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "speculators"


def static_speculator_dir(setting: str | None, model_path: str) -> Path | None:
    """Where the static drafter for `model_path` lives, per AtlasConfig.static_speculator
    ('auto': the bundled one for the model, if any; 'none'/None: no static drafter)."""
    if setting is None or str(setting).lower() in ("", "none"):
        return None
    if setting == "auto":
        d = BUNDLED_DIR / Path(str(model_path)).name
        return d if (d / "neural.json").is_file() else None
    d = Path(setting).expanduser()
    if not (d / "neural.json").is_file():
        raise FileNotFoundError(
            f"static_speculator {setting!r} has no neural.json: pass the --out directory of "
            f"`atlas-rl train-speculator`, 'auto' (the bundled drafter) or 'none'")
    return d


class DrafterNet(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.w_in = nn.Linear(2 * hidden_size, hidden_size)
        self.w_out = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.Parameter(torch.ones(hidden_size))
        nn.init.zeros_(self.w_out.weight)  # starts as "the next hidden state is this one"
        nn.init.zeros_(self.w_out.bias)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        z = h + self.w_out(F.silu(self.w_in(torch.cat([h, e], dim=-1))))
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps)
        return z * self.norm

    def inference_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """The weights laid out for drafting, in ``dtype``: transposed copies (on 2 CPU
        cores a [4, 1152] x [1152, 576] product is ~8x faster against a contiguous
        [in, out] matrix than against nn.Linear's [out, in] one). Cached until a parameter
        is modified (tensor version counters: optimizer steps, load_state_dict, publish)
        or another dtype is asked for."""
        params = (self.w_in.weight, self.w_in.bias, self.w_out.weight, self.w_out.bias,
                  self.norm)
        key = (dtype, *((id(t), t._version) for t in params))
        cached = getattr(self, "_inference_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weights = (self.w_in.weight.detach().t().to(dtype).contiguous(),
                           self.w_in.bias.detach().to(dtype).clone(),
                           self.w_out.weight.detach().t().to(dtype).contiguous(),
                           self.w_out.bias.detach().to(dtype).clone(),
                           self.norm.detach().to(dtype).clone())
            cached = self._inference_cache = (key, weights)
        return cached[1]

    @staticmethod
    def draft_step(weights, h: torch.Tensor, e: torch.Tensor, eps: float) -> torch.Tensor:
        """`forward` with `inference_weights` (no autograd; the same function)."""
        w_in_t, b_in, w_out_t, b_out, g = weights
        a = F.silu(torch.addmm(b_in, torch.cat([h, e], dim=-1), w_in_t))
        z = h + torch.addmm(b_out, a, w_out_t)
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
        return z * g


class NeuralSpeculator(Speculator):
    """Drafts with `DrafterNet`; learns online from the hidden states the policy computed
    while generating (unless ``frozen``)."""

    name = "neural"
    uses_hidden_states = True

    def __init__(self, draft_vocab_size: int = 4096, lr: float = 1e-3,
                 train_budget_fraction: float = 0.1, max_buffer_rows: int = 16384,
                 batch_rows: int = 256, max_epochs: int = 2, frozen: bool = False,
                 seed: int = 0):
        if draft_vocab_size < 2:
            raise ValueError(f"draft_vocab_size must be >= 2, got {draft_vocab_size}")
        if not 0.0 <= train_budget_fraction <= 1.0:
            raise ValueError("train_budget_fraction must be in [0, 1] (share of the rollout "
                             f"time spent training), got {train_budget_fraction}")
        self.draft_vocab_size = int(draft_vocab_size)
        self.lr = float(lr)
        self.train_budget_fraction = float(train_budget_fraction)
        self.max_buffer_rows = int(max_buffer_rows)
        self.batch_rows = int(batch_rows)
        self.max_epochs = int(max_epochs)
        self.frozen = bool(frozen)
        self.net: DrafterNet | None = None
        self.vocab: torch.Tensor | None = None  # draft vocabulary (token ids), sorted
        self.version = 0  # bumped whenever new weights are published
        self.rollbacks = 0
        self._embed = self._head = self._head_sub = None
        self._head_version = -1
        self._optimizer_state = None
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(seed)
        self._device_generator: torch.Generator | None = None  # sampling drafts on CUDA
        self._last: dict[object, tuple[torch.Tensor, int]] = {}  # key -> (h, last token)
        self._streams: dict[object, list] = {}  # key -> [next_pos, [h rows], [tokens]]
        self._done: list = []  # finished streams waiting for learn()
        self._buffer: deque = deque()  # (inputs h, tokens, target h) chunks, FIFO
        self._buffer_rows = 0
        self._loss_ema: float | None = None
        self.weights_version = 0  # bumped by the engine after a policy weight sync

    # --- the target's tensors ---------------------------------------------------------

    def attach_target(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """Share the policy's token embedding [V, d] and LM head [V, d] (references: a
        weight sync that updates them in place is seen here)."""
        if embed.shape[-1] != head.shape[-1]:
            raise ValueError(f"embedding width {embed.shape[-1]} != head width {head.shape[-1]}")
        if embed.device != head.device:
            raise ValueError(f"embedding on {embed.device} but LM head on {head.device}: the "
                             "drafter runs where both are")
        self._embed, self._head = embed, head
        d = int(embed.shape[-1])
        if self.net is None:
            self.net = DrafterNet(d)
        elif self.net.hidden_size != d:
            raise ValueError(
                f"the drafter was trained for hidden size {self.net.hidden_size}, but the "
                f"policy's is {d}: train one for this model with `atlas-rl train-speculator`")
        self.net.to(embed.device)  # float32 weights beside the policy's tensors
        if self.vocab is None:
            self.vocab = torch.arange(min(self.draft_vocab_size, int(head.shape[0])))
        if int(self.vocab.max()) >= int(head.shape[0]):
            raise ValueError(f"the drafter's vocabulary has token ids up to "
                             f"{int(self.vocab.max())}, beyond the policy's {int(head.shape[0])}")
        self._head_version = -1

    @property
    def ready(self) -> bool:
        return self._embed is not None and self.net is not None

    def _draft_dtype(self) -> torch.dtype:
        """Matmul dtype for drafting: a bf16/fp16 policy's own dtype on CUDA (tensor cores;
        the softmax and the sampling stay float32), float32 otherwise."""
        dtype = self._head.dtype
        if self._head.is_cuda and dtype in (torch.bfloat16, torch.float16):
            return dtype
        return torch.float32

    def _sub_head(self) -> torch.Tensor:
        if self._head_version != self.weights_version or self._head_sub is None:
            # self.vocab stays on the CPU (saved state, set_vocab_from_counts)
            self._vocab_dev = to_device(self.vocab, None, self._head.device)
            self._head_sub = self._head.detach().index_select(0, self._vocab_dev).float()
            # [d, |S|], for drafting
            self._head_sub_t = self._head_sub.t().to(self._draft_dtype()).contiguous()
            self._head_version = self.weights_version
        return self._head_sub

    def set_vocab_from_counts(self, counts: torch.Tensor) -> None:
        """Draft vocabulary = the `draft_vocab_size` most frequent tokens of `counts` [V]."""
        k = min(self.draft_vocab_size, counts.numel())
        self.vocab = torch.sort(torch.topk(counts.float(), k).indices).values
        self._head_version = -1

    # --- hidden states seen during generation -------------------------------------------

    def observe(self, key, hidden: torch.Tensor, tokens: Sequence[int], first_pos: int) -> None:
        """The policy computed ``hidden[i]`` at position ``first_pos + i`` and sampled
        ``tokens[i]`` (the token at position ``first_pos + i + 1``) from it. The rows
        are kept as given: callers pass memory they own (vLLM reuses its buffers, so the
        proposer copies each step's block once)."""
        if not len(tokens):
            return
        hidden = hidden.detach().float()
        self._last[key] = (hidden[-1], int(tokens[-1]))
        if self.frozen:
            return
        stream = self._streams.get(key)
        if stream is None or stream[0] != first_pos:  # a gap (preemption): new segment
            if stream is not None:
                self._done.append(stream)
            stream = self._streams[key] = [first_pos, [], []]
        stream[1].append(hidden)
        stream[2].extend(int(t) for t in tokens)
        stream[0] = first_pos + len(tokens)

    def finish(self, key) -> None:
        self._last.pop(key, None)
        stream = self._streams.pop(key, None)
        if stream is not None:
            self._done.append(stream)

    def begin_batch(self) -> None:
        self._last.clear()

    # --- drafting ---------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, keys, contexts, max_lengths, sample: Sequence[bool] | None = None) -> list[Draft]:
        drafts = [EMPTY_DRAFT] * len(keys)
        if not self.ready:
            return drafts
        rows = [i for i, (k, n) in enumerate(zip(keys, max_lengths)) if n > 0 and k in self._last]
        if not rows:
            return drafts
        self._sub_head()
        head_t, vocab = self._head_sub_t, self._vocab_dev
        device, dtype = head_t.device, head_t.dtype
        weights, eps = self.net.inference_weights(dtype), self.net.eps
        # Per-request bookkeeping stays in Python lists; what the device needs goes over
        # in non-blocking copies, so nothing below waits for it until the results.
        h = to_device(torch.stack([self._last[keys[i]][0] for i in rows]), None, device).to(dtype)
        tok = to_device([self._last[keys[i]][1] for i in rows], torch.long, device)
        lens = [max_lengths[i] for i in rows]
        flags = [bool(sample[i]) if sample is not None else False for i in rows]
        any_sample = any(flags)
        if any_sample:
            do_sample = to_device(flags, torch.bool, device)
            generator = self._sampling_generator(device)
        toks, confs, qs = [], [], []
        for _ in range(max(lens)):
            y = DrafterNet.draft_step(weights, h, self._embed.index_select(0, tok).to(dtype), eps)
            q = torch.softmax((y @ head_t).float(), dim=-1)
            idx = q.argmax(-1)
            if any_sample:  # inverse CDF: one uniform per row (torch.multinomial is slower)
                cdf = q.cumsum(-1)
                u = torch.rand(len(rows), 1, generator=generator, device=device) * cdf[:, -1:]
                sampled = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=q.shape[1] - 1)
                idx = torch.where(do_sample, sampled, idx)
            toks.append(idx)
            confs.append(q.gather(1, idx[:, None]).squeeze(1))
            qs.append(q)
            h, tok = y, vocab[idx]
        # The one wait for the device: a single copy of tokens and confidences (ids are
        # exact in float64), because the Draft contract is Python lists.
        host = torch.stack((vocab[torch.stack(toks, 1)].double(),
                            torch.stack(confs, 1).double())).cpu()
        toks, confs = host[0].long().tolist(), host[1].tolist()
        qs = torch.stack(qs, 1)  # [rows, steps, |S|]
        for j, i in enumerate(rows):
            n = lens[j]
            drafts[i] = Draft(toks[j][:n], confs[j][:n],
                              q_ids=vocab.expand(n, -1) if flags[j] else None,
                              q=qs[j, :n] if flags[j] else None)
        return drafts

    # --- learning ---------------------------------------------------------------------

    def _triples(self, streams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        xs, ts, ys = [], [], []
        for _, hs, toks in streams:
            if len(toks) < 2:
                continue
            h = torch.cat(hs)
            xs.append(h[:-1])
            ts.append(torch.tensor(toks[:-1]))
            ys.append(h[1:])
        if not xs:
            return None
        return torch.cat(xs), torch.cat(ts), torch.cat(ys)

    def _sampling_generator(self, device: torch.device) -> torch.Generator:
        """The generator of draft sampling: the CPU one on the CPU (as before devices), one
        seeded the same way on an accelerator (a CPU generator cannot feed CUDA draws)."""
        if device.type == "cpu":
            return self._generator
        gen = self._device_generator
        if gen is None or gen.device != device:
            gen = self._device_generator = torch.Generator(device).manual_seed(self.seed)
        return gen

    def add_examples(self, h: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> None:
        """Training rows: (hidden at t, token t+1) -> hidden at t+1. Bounded FIFO."""
        self._buffer.append((h.float(), tokens.long(), target.float()))
        self._buffer_rows += len(tokens)
        while self._buffer_rows > self.max_buffer_rows and len(self._buffer) > 1:
            self._buffer_rows -= len(self._buffer.popleft()[1])

    def take_captured(self):
        """The training rows (h_t, x_{t+1}, h_{t+1}) captured since the last call, or
        None; the capture is emptied."""
        streams = self._done + list(self._streams.values())
        self._done = []
        self._streams = {}
        return self._triples(streams)

    def collect(self) -> int:
        """Move the hidden states captured since the last call into the training buffer;
        returns the number of new training rows."""
        got = self.take_captured()
        if got is None:
            return 0
        self.add_examples(*got)
        return len(got[1])

    def buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole training buffer, oldest rows first: (h_t, x_{t+1}, h_{t+1})."""
        return tuple(torch.cat([b[i] for b in self._buffer]) for i in range(3))

    def clear_buffer(self) -> None:
        self._buffer.clear()
        self._buffer_rows = 0

    def published(self) -> dict:
        """The published drafter (weights and counters), e.g. to broadcast to other ranks."""
        return {"net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "version": self.version, "rollbacks": self.rollbacks, "loss_ema": self._loss_ema}

    def load_published(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.version, self.rollbacks = state["version"], state["rollbacks"]
        self._loss_ema = state["loss_ema"]

    def reset_training(self) -> None:
        """Forget the buffer and the optimizer; version 0 (a freshly distilled drafter)."""
        self.clear_buffer()
        self._optimizer_state = None
        self.version = 0

    def learn(self, sequences=(), time_budget: float | None = None) -> dict[str, float]:
        """Train on the hidden states captured since the last call (the batch's rollouts;
        `sequences` themselves are not needed), for at most `time_budget` seconds."""
        if self.frozen or not self.ready:
            self._done, self._streams = [], {}
            return {}
        start = time.perf_counter()
        self.collect()
        if not self._buffer:
            return {}
        if time_budget is not None:  # collecting the capture came out of the budget
            time_budget = max(0.0, time_budget - (time.perf_counter() - start))
        return self.train(time_budget=time_budget, max_epochs=self.max_epochs)

    def _autocast(self, device: torch.device):
        """bf16 autocast for training on CUDA when the policy is bf16 (matmuls in bf16,
        softmax and the loss in float32, weights and AdamW state float32); fp16 policies
        train in float32 (no loss scaling here), as does the CPU."""
        if device.type == "cuda" and self._head.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, net, h, tok, target, head):
        y = net(h, self._embed.detach().index_select(0, tok).float().clone())
        with torch.no_grad():
            p = torch.softmax(target @ head.T, dim=-1)
        return -(p * torch.log_softmax(y @ head.T, dim=-1)).sum(-1).mean()

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor, tok: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """First-position acceptance on held-out rows, against the policy's full-vocabulary
        p: a distribution draft is accepted with sum_v min(p_v, q_v), a one-hot draft of
        q's argmax with p(argmax)."""
        head_sub = self._sub_head()
        vocab = self._vocab_dev
        h, tok, target = (t.to(vocab.device) for t in (h, tok, target))
        head_full = self._head.detach().float()
        p = torch.softmax(target.float() @ head_full.T, dim=-1)
        y = self.net(h.float(), self._embed.detach().index_select(0, tok).float())
        q_sub = torch.softmax(y @ head_sub.T, dim=-1)
        q = torch.zeros_like(p).index_copy_(1, vocab, q_sub)
        return {"accept_distribution": float(torch.minimum(p, q).sum(-1).mean()),
                "accept_one_hot": float(p.gather(1, vocab[q_sub.argmax(-1)][:, None]).mean()),
                "accept_ceiling_one_hot": float(p.max(-1).values.mean()),
                "vocab_coverage": float(p.index_select(1, vocab).sum(-1).mean())}

    def train(self, time_budget: float | None = None, max_epochs: int = 1,
              progress=None) -> dict[str, float]:
        """Distil on the buffer: newest rows first, up to `max_epochs` passes or the time
        budget. A loss that turns NaN or explodes rolls the drafter back to its last
        published weights (counted in `rollbacks`)."""
        start = time.perf_counter()
        # Copies: tensors made under vLLM's inference mode cannot enter autograd. The
        # buffer may sit on the CPU (the proposer copies hidden states there): one move.
        head = self._sub_head().clone()
        device = head.device
        h, tok, target = (x.to(device, copy=True) for x in self.buffer())
        net = copy.deepcopy(self.net)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=0.0)
        if self._optimizer_state is not None:
            opt.load_state_dict(self._optimizer_state)
        losses, diverged, rows_seen = [], False, 0
        n = len(tok)
        slowest = 0.0  # the longest minibatch so far: the next one may take as long
        for epoch in range(max_epochs):
            order = to_device(torch.randperm(n, generator=self._generator), None, device)
            for s in range(0, n, self.batch_rows):
                t0 = time.perf_counter()
                if (time_budget is not None and rows_seen
                        and t0 - start + slowest > time_budget):
                    break  # stop before the budget, not after (one minibatch at least)
                idx = order[s:s + self.batch_rows]
                with self._autocast(device):
                    loss = self._loss(net, h[idx], tok[idx], target[idx], head)
                value = float(loss.detach())  # a sync per minibatch: divergence and budget
                limit = 4 * self._loss_ema + 1.0 if self._loss_ema is not None else math.inf
                if not math.isfinite(value) or value > limit:
                    diverged = True
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                losses.append(value)
                rows_seen += len(idx)
                slowest = max(slowest, time.perf_counter() - t0)
                if progress is not None:
                    progress(epoch, s, n, value)
            else:
                continue
            break
        stats = {"drafter_train_seconds": time.perf_counter() - start,
                 "drafter_rows": float(rows_seen), "drafter_buffer_rows": float(n)}
        if diverged:
            self.rollbacks += 1  # keep self.net (the last good weights) and the old optimizer
            stats["drafter_rollback"] = 1.0
            stats["drafter_rollbacks"] = float(self.rollbacks)
            return stats
        if losses:
            mean = sum(losses) / len(losses)
            self._loss_ema = mean if self._loss_ema is None else 0.7 * self._loss_ema + 0.3 * mean
            stats["drafter_loss"] = mean
            self.net.load_state_dict(net.state_dict())  # publish
            self._optimizer_state = opt.state_dict()
            self.version += 1
        stats["drafter_version"] = float(self.version)
        return stats

    # --- state ------------------------------------------------------------------------

    def state(self):
        if self.net is None:
            return {}, {"empty": True}
        tensors = {f"net.{k}": v.detach().cpu().clone()
                   for k, v in self.net.state_dict().items()}
        tensors["vocab"] = self.vocab.clone()
        meta = {"hidden_size": self.net.hidden_size, "draft_vocab_size": self.draft_vocab_size,
                "lr": self.lr, "version": self.version, "rollbacks": self.rollbacks,
                "loss_ema": self._loss_ema}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        if meta.get("empty"):
            return
        net = DrafterNet(int(meta["hidden_size"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net = net
        self.vocab = tensors["vocab"].long()
        self.draft_vocab_size = int(meta.get("draft_vocab_size", len(self.vocab)))
        self.version = int(meta.get("version", 0))
        self.rollbacks = int(meta.get("rollbacks", 0))
        self._loss_ema = meta.get("loss_ema")
        self._optimizer_state = None
        self._head_version = -1
        if self._embed is not None:
            self.attach_target(self._embed, self._head)
