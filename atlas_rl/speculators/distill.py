"""The neural drafter's distillation side: the training buffer, budgeted training with
rollback, held-out evaluation, and the published weights other ranks receive.

Training is distillation from the policy's own distribution: every target hidden state
h_{t+1} gives p = softmax(h_{t+1} W^T), so the loss is the cross-entropy of q against p
restricted to the draft vocabulary (the best q with that support). Rows are
(h_t, x_{t+1}, h_{t+1}): the hidden state the policy sampled x_{t+1} from, that token,
and the hidden state at the next position.

Devices: on CUDA with a bf16 policy, training runs under bf16 autocast with float32
weights and AdamW state; on the CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import deque
from typing import Callable

import torch

from atlas_rl.kernels.staging import to_device
from atlas_rl.speculators.drafter_net import DrafterNet

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h_t, x_{t+1}, h_{t+1})


class DistillBuffer:
    """Training rows, oldest first, bounded to `max_rows` (FIFO by chunk)."""

    def __init__(self, max_rows: int = 16384):
        self.max_rows = int(max_rows)
        self._chunks: deque = deque()
        self.num_rows = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def add(self, h: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> None:
        self._chunks.append((h.float(), tokens.long(), target.float()))
        self.num_rows += len(tokens)
        while self.num_rows > self.max_rows and len(self._chunks) > 1:
            self.num_rows -= len(self._chunks.popleft()[1])

    def rows(self) -> Rows:
        """The whole buffer, oldest rows first."""
        return tuple(torch.cat([c[i] for c in self._chunks]) for i in range(3))

    def clear(self) -> None:
        self._chunks.clear()
        self.num_rows = 0


class Distiller:
    """Trains a `DrafterNet` on its buffer within a time budget and publishes the result
    into it; a loss that turns NaN or explodes leaves the published weights as they were
    (a rollback, counted)."""

    def __init__(self, lr: float = 1e-3, max_buffer_rows: int = 16384, batch_rows: int = 256,
                 max_epochs: int = 2):
        self.lr = float(lr)
        self.batch_rows = int(batch_rows)
        self.max_epochs = int(max_epochs)
        self.buffer = DistillBuffer(max_buffer_rows)
        self.version = 0     # bumped whenever new weights are published
        self.rollbacks = 0
        self.loss_ema: float | None = None
        self.optimizer_state = None

    def reset(self) -> None:
        """Forget the buffer and the optimizer; version 0 (a freshly distilled drafter)."""
        self.buffer.clear()
        self.optimizer_state = None
        self.version = 0

    def published(self, net: DrafterNet) -> dict:
        """The published drafter (weights and counters), e.g. to broadcast to other ranks."""
        return {"net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "version": self.version, "rollbacks": self.rollbacks, "loss_ema": self.loss_ema}

    def load_published(self, net: DrafterNet, state: dict) -> None:
        net.load_state_dict(state["net"])
        self.version, self.rollbacks = state["version"], state["rollbacks"]
        self.loss_ema = state["loss_ema"]

    def train(self, net: DrafterNet, embed: torch.Tensor, head: torch.Tensor,
              generator: torch.Generator, time_budget: float | None = None,
              max_epochs: int = 1, progress: Callable | None = None) -> dict[str, float]:
        """Distil on the buffer: shuffled rows, up to `max_epochs` passes or the time
        budget (stopping before it, one minibatch at least). `head`: the LM head rows of
        the draft vocabulary [|S|, d]. Publishes into `net` unless the loss diverged."""
        start = time.perf_counter()
        # Copies: tensors made under vLLM's inference mode cannot enter autograd. The
        # buffer may sit on the CPU (the proposer copies hidden states there): one move.
        head = head.clone()
        device = head.device
        h, tok, target = (x.to(device, copy=True) for x in self.buffer.rows())
        work = copy.deepcopy(net)
        opt = torch.optim.AdamW(work.parameters(), lr=self.lr, weight_decay=0.0)
        if self.optimizer_state is not None:
            opt.load_state_dict(self.optimizer_state)
        losses, diverged, rows_seen, slowest = [], False, 0, 0.0
        n = len(tok)
        for epoch in range(max_epochs):
            order = to_device(torch.randperm(n, generator=generator), None, device)
            for s in range(0, n, self.batch_rows):
                t0 = time.perf_counter()
                if time_budget is not None and rows_seen and t0 - start + slowest > time_budget:
                    break  # the next minibatch may take as long as the slowest so far
                idx = order[s:s + self.batch_rows]
                with _autocast(device, embed.dtype):
                    loss = distill_loss(work, embed, h[idx], tok[idx], target[idx], head)
                value = float(loss.detach())  # a sync per minibatch: divergence and budget
                limit = 4 * self.loss_ema + 1.0 if self.loss_ema is not None else math.inf
                if not math.isfinite(value) or value > limit:
                    diverged = True
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(work.parameters(), 1.0)
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
            self.rollbacks += 1  # keep the published weights and the old optimizer
            return {**stats, "drafter_rollback": 1.0, "drafter_rollbacks": float(self.rollbacks)}
        if losses:
            mean = sum(losses) / len(losses)
            self.loss_ema = mean if self.loss_ema is None else 0.7 * self.loss_ema + 0.3 * mean
            stats["drafter_loss"] = mean
            net.load_state_dict(work.state_dict())  # publish
            self.optimizer_state = opt.state_dict()
            self.version += 1
        stats["drafter_version"] = float(self.version)
        return stats


def _autocast(device: torch.device, policy_dtype: torch.dtype):
    """bf16 autocast for training on CUDA when the policy is bf16 (matmuls in bf16,
    softmax and the loss in float32); fp16 policies train in float32 (no loss scaling
    here), as does the CPU."""
    if device.type == "cuda" and policy_dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def distill_loss(net: DrafterNet, embed: torch.Tensor, h, tok, target, head) -> torch.Tensor:
    """Cross-entropy of the drafter's q against the policy's p, both over the draft
    vocabulary's head rows `head`."""
    y = net(h, embed.detach().index_select(0, tok).float().clone())
    with torch.no_grad():
        p = torch.softmax(target @ head.T, dim=-1)
    return -(p * torch.log_softmax(y @ head.T, dim=-1)).sum(-1).mean()


@torch.no_grad()
def acceptance(net: DrafterNet, embed: torch.Tensor, head: torch.Tensor, vocab: torch.Tensor,
               h: torch.Tensor, tok: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """First-position acceptance on held-out rows, against the policy's full-vocabulary
    p (`head`: the full LM head [V, d], `vocab`: the draft vocabulary's ids): a
    distribution draft is accepted with sum_v min(p_v, q_v), a one-hot draft of q's
    argmax with p(argmax)."""
    h, tok, target = (t.to(vocab.device) for t in (h, tok, target))
    head_full = head.detach().float()
    head_sub = head_full.index_select(0, vocab)
    p = torch.softmax(target.float() @ head_full.T, dim=-1)
    y = net(h.float(), embed.detach().index_select(0, tok).float())
    q_sub = torch.softmax(y @ head_sub.T, dim=-1)
    q = torch.zeros_like(p).index_copy_(1, vocab, q_sub)
    return {"accept_distribution": float(torch.minimum(p, q).sum(-1).mean()),
            "accept_one_hot": float(p.gather(1, vocab[q_sub.argmax(-1)][:, None]).mean()),
            "accept_ceiling_one_hot": float(p.max(-1).values.mean()),
            "vocab_coverage": float(p.index_select(1, vocab).sum(-1).mean())}
