"""The neural drafter's distillation side: the training buffer, budgeted training with
rollback, the publish gate, held-out evaluation, and the published weights other ranks
receive.

The publish gate judges the drafter on rows it has not trained on, in one of two ways
(`Distiller.gate`):

- ``"next-batch"`` (the default): every update trains on the whole buffer and publishes
  its candidate; the next update, before it trains, scores the published drafter and the
  one it replaced on the batch just captured (which neither has seen) and rolls back to
  the replaced one where the published drafter scores below it by more than `gate_z`
  standard errors of the paired difference (a distribution draft's first-position
  acceptance against the policy's p over the draft vocabulary). Nothing is held back from
  training, and a decision is judged on the whole batch (up to `judge_rows`), not a
  quarter of it; the price is that a bad update drafts for one batch before it is undone.
- ``"held-out"``: an update trains a candidate on the buffer less the newest rows' last
  quarter (at most `gate_rows`: the end of the batch just captured, whole sequences but
  for one), and publishes it unless its acceptance on those held-out rows falls below the
  published drafter's by more than `gate_z` standard errors; the held-out rows join the
  training pool at the next update. Its decisions are themselves checked: the next gated
  update scores the two drafters of the last decision on its own held-out rows and
  reports whether the decision was right.

Either way adaptation cannot make the drafter worse, beyond a batch's noise, on what the
policy samples now for longer than a batch, and the check is reported per update
(``drafter_gate_right``: the decision was right on a batch neither drafter trained on;
``drafter_gate_check_margin``: the later drafter's score minus the earlier one's). The
decisions depend on the buffer alone, so ranks holding the same buffer decide alike.
``"off"``: every update that does not diverge is published.

Each update's first pass takes the rows captured since the last update first, in a random
order, then the older ones (the replay buffer), in a random order: a time budget that
ends the pass early is spent on what the policy samples now (after a domain switch the
buffer is mostly the old domain, and a uniform order gave the new rows a small share of the
passes); later passes are uniform.

Training is distillation from the policy's own distribution: every target hidden state
h_{t+1} gives p = softmax(h_{t+1} W^T), restricted to the draft vocabulary (its best q
with that support). The loss (`Distiller.loss`) is by default "tv": the total variation
between q and p, which is what a distribution draft loses of acceptance (accepted with
sum_v min(p_v, q_v) = 1 - TV), plus 0.1 x the cross-entropy (a gradient where the two
hardly overlap); "ce" is the cross-entropy alone. Replayed on four domain gaps, TV
adapted 2-8 points further towards the domain oracle than the cross-entropy in the same
budget (scripts/replay_adaptation.py). Rows are
(h_t, x_{t+1}, h_{t+1}): the hidden state the policy sampled x_{t+1} from, that token,
and the hidden state at the next position.

Devices: training runs under bf16 autocast with float32 weights and AdamW state on CUDA
with a bf16 policy and on CPUs with bf16 units (twice the rows a second of a budget);
elsewhere it is float32.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import deque
from typing import Callable

import torch

from atlas_rl.config import DRAFTER_LOSSES, PUBLISH_GATES, drafter_loss, publish_gate
from atlas_rl.kernels.staging import to_device
from atlas_rl.machine import cpu_has_native_bf16
from atlas_rl.speculators.base import Stop, stopped
from atlas_rl.speculators.drafter_net import DrafterNet

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h_t, x_{t+1}, h_{t+1})


class DistillBuffer:
    """Training rows, oldest first, bounded to `max_rows` (FIFO by chunk)."""

    def __init__(self, max_rows: int = 16384):
        self.max_rows = int(max_rows)
        self._chunks: deque = deque()
        self.num_rows = 0
        self.fresh_rows = 0  # rows added since the last update (the newest, at the end)

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def add(self, h: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> None:
        self._chunks.append((h.float(), tokens.long(), target.float()))
        self.num_rows += len(tokens)
        self.fresh_rows += len(tokens)
        while self.num_rows > self.max_rows and len(self._chunks) > 1:
            self.num_rows -= len(self._chunks.popleft()[1])
        self.fresh_rows = min(self.fresh_rows, self.num_rows)

    def rows(self) -> Rows:
        """The whole buffer, oldest rows first."""
        return tuple(torch.cat([c[i] for c in self._chunks]) for i in range(3))

    def clear(self) -> None:
        self._chunks.clear()
        self.num_rows = self.fresh_rows = 0


class Distiller:
    """Trains a `DrafterNet` on its buffer within a time budget and publishes the result
    into it; a loss that turns NaN or explodes leaves the published weights as they were
    (a rollback, counted)."""

    #: The publish gates (`GATES`, the module's docstring). "held-out": rows from the end
    #: of the newest batch, at most `gate_rows` (a quarter of the batch's rows);
    #: "next-batch": the newest batch's last `judge_rows` at most. No judgement on fewer
    #: than `min_gate_rows` (too few to judge on: the candidate is published as before).
    GATES = PUBLISH_GATES
    gate_rows = 512
    judge_rows = 2048
    min_gate_rows = 64
    #: A candidate is refused only when it scores below the published drafter by more
    #: than this many standard errors of the rows' paired differences (blocks of
    #: `gate_block` consecutive rows: neighbouring positions of a completion are not
    #: independent). 0: refused whenever it scores lower, however little. Replayed on a
    #: domain gap (`atlas_rl.replay`), refusing at 0 cost 2-11 points of the way from the
    #: frozen drafter to the domain oracle: most refusals were a batch's noise, and each
    #: one threw an update's learning away.
    gate_z = 2.0
    gate_block = 32

    #: The training losses (`distill_loss`).
    LOSSES = DRAFTER_LOSSES

    def __init__(self, lr: float = 1e-3, max_buffer_rows: int = 16384, batch_rows: int = 256,
                 max_epochs: int = 2, gate: str | bool = "next-batch", loss: str = "tv"):
        self.lr = float(lr)
        self.loss = loss
        self.batch_rows = int(batch_rows)
        self.max_epochs = int(max_epochs)
        self.gate = gate
        #: bf16 autocast for training on the CPU: None decides by the CPU's bf16 units
        #: (`_autocast`); False keeps float32
        self.cpu_bf16: bool | None = None
        self.buffer = DistillBuffer(max_buffer_rows)
        self.version = 0     # bumped whenever new weights are published
        self.rollbacks = 0   # updates not published: diverged, or lost the publish gate
        self.loss_ema: float | None = None
        #: the loss `loss_ema` averages (drafters saved before the TV loss: "ce"); the
        #: divergence check compares a loss with its own kind's average only
        self.loss_ema_kind: str = self.loss
        self.optimizer_state = None
        # the last gated decision (published before, candidate, published?), kept on the
        # CPU until the next gated update checks it on its own held-out rows
        self._last_decision: tuple[dict, dict, bool] | None = None
        # "next-batch": the drafter the last publication replaced and its optimizer state,
        # on the CPU until the next update judges the two on its batch
        self._replaced: tuple[dict, dict | None] | None = None

    @property
    def loss(self) -> str:
        """The training loss, one of `LOSSES`: "tv" (total variation + 0.1 x cross-
        entropy) or "ce" (cross-entropy)."""
        return self._loss

    @loss.setter
    def loss(self, value: str) -> None:
        self._loss = drafter_loss(value)

    @property
    def gate(self) -> str:
        """The publish gate, one of `GATES` (set as one of them, or True / False)."""
        return self._gate

    @gate.setter
    def gate(self, value: str | bool) -> None:
        self._gate = publish_gate(value)

    def reset(self) -> None:
        """Forget the buffer and the optimizer; version 0 (a freshly distilled drafter)."""
        self.buffer.clear()
        self.optimizer_state = None
        self.version = 0
        self._last_decision = self._replaced = None

    def published(self, net: DrafterNet) -> dict:
        """The published drafter (weights and counters), e.g. to broadcast to other ranks."""
        return {"net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "version": self.version, "rollbacks": self.rollbacks, "loss_ema": self.loss_ema,
                "loss_ema_kind": self.loss_ema_kind}

    def load_published(self, net: DrafterNet, state: dict) -> None:
        net.load_state_dict(state["net"])
        self.version, self.rollbacks = state["version"], state["rollbacks"]
        self.loss_ema = state["loss_ema"]
        self.loss_ema_kind = state.get("loss_ema_kind", self.loss)

    def train(self, net: DrafterNet, embed: torch.Tensor, head: torch.Tensor,
              generator: torch.Generator, time_budget: float | None = None,
              max_epochs: int = 1, progress: Callable | None = None,
              stop: Stop | None = None) -> dict[str, float]:
        """Distil on the buffer: shuffled rows, up to `max_epochs` passes or the time
        budget (stopping before it, one minibatch at least), or until `stop` is set
        (checked before each minibatch: what was trained by then is published, as at the
        end of a budget). `head`: the LM head rows of the draft vocabulary [|S|, d].
        Publishes into `net` unless the loss diverged or the candidate loses the publish
        gate (the module's docstring)."""
        if stopped(stop):  # before anything: the rows stay fresh for the next update
            return {}
        start = time.perf_counter()
        # Copies: tensors made under vLLM's inference mode cannot enter autograd. The
        # buffer may sit on the CPU (the proposer copies hidden states there): one move.
        head = head.clone()
        device = head.device
        h, tok, target = (x.to(device, copy=True) for x in self.buffer.rows())
        fresh = min(self.buffer.fresh_rows, len(tok))
        held = min(self.gate_rows, fresh // 4) if self.gate == "held-out" else 0
        if held < self.min_gate_rows or held >= len(tok):
            held = 0
        self.buffer.fresh_rows = 0  # the held-out rows train from the next update on
        check = {}
        if self.gate == "next-batch":  # judged before training, outside its budget (as
            # the held-out gate judges after it)
            check = self._judge_last_publication(net, embed, head, fresh, (h, tok, target))
            start = time.perf_counter()
        if held:
            held_rows = (h[-held:], tok[-held:], target[-held:])
            h, tok, target = h[:-held], tok[:-held], target[:-held]
            check = self._check_last_decision(net, embed, head, held_rows)
        work = copy.deepcopy(net)
        opt = torch.optim.AdamW(work.parameters(), lr=self.lr, weight_decay=0.0)
        if self.optimizer_state is not None:
            # a copy: AdamW steps its loaded moments in place, and the saved state must stay
            # the one that made the published drafter (a refused candidate or a roll-back
            # goes back to it)
            opt.load_state_dict(copy.deepcopy(self.optimizer_state))
        losses, diverged, rows_seen, slowest = [], False, 0, 0.0
        if self.loss_ema_kind != self.loss:  # an average of another loss: start afresh
            self.loss_ema, self.loss_ema_kind = None, self.loss
        n = len(tok)
        newest = min(max(0, fresh - held), n)  # the rows captured since the last update
        for epoch in range(max_epochs):
            order = torch.randperm(n, generator=generator)
            if epoch == 0 and 0 < newest < n:  # this batch's rows first, then the replay
                order = torch.cat([n - newest + torch.randperm(newest, generator=generator),
                                   torch.randperm(n - newest, generator=generator)])
            order = to_device(order, None, device)
            for s in range(0, n, self.batch_rows):
                t0 = time.perf_counter()
                if time_budget is not None and rows_seen and t0 - start + slowest > time_budget:
                    break  # the next minibatch may take as long as the slowest so far
                if stopped(stop):
                    break
                idx = order[s:s + self.batch_rows]
                with _autocast(device, embed.dtype, self.cpu_bf16):
                    loss = distill_loss(work, embed, h[idx], tok[idx], target[idx], head,
                                        self.loss)
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
                 "drafter_rows": float(rows_seen), "drafter_buffer_rows": float(n + held),
                 **check}
        if diverged:
            self.rollbacks += 1  # keep the published weights and the old optimizer
            return {**stats, "drafter_rollback": 1.0, "drafter_rollbacks": float(self.rollbacks)}
        if losses:
            mean = sum(losses) / len(losses)
            self.loss_ema = mean if self.loss_ema is None else 0.7 * self.loss_ema + 0.3 * mean
            stats["drafter_loss"] = mean
            publish = True
            if held:
                published_rows = gate_row_scores(net, embed, head, *held_rows)
                candidate_rows = gate_row_scores(work, embed, head, *held_rows)
                published_score = float(published_rows.mean())
                candidate_score = float(candidate_rows.mean())
                publish, se = gate_publishes(candidate_rows, published_rows, self.gate_z,
                                             self.gate_block)
                stats["drafter_gate_se"] = se
                self._last_decision = (_cpu_state(net), _cpu_state(work), publish)
                stats.update(drafter_gate_rows=float(held),
                             drafter_published_score=published_score,
                             drafter_candidate_score=candidate_score,
                             drafter_published=float(publish))
            if self.gate == "next-batch":  # published; judged by the next update
                stats["drafter_published"] = 1.0
            if publish:
                if self.gate == "next-batch":
                    self._replaced = (_cpu_state(net), self.optimizer_state)
                net.load_state_dict(work.state_dict())
                self.optimizer_state = opt.state_dict()
                self.version += 1
            else:  # the published drafter stays, with the optimizer state that made it
                self.rollbacks += 1
            stats["drafter_train_seconds"] = time.perf_counter() - start
        stats["drafter_version"] = float(self.version)
        stats["drafter_rollbacks"] = float(self.rollbacks)
        return stats


    def _judge_last_publication(self, net: DrafterNet, embed: torch.Tensor,
                                head: torch.Tensor, fresh: int, rows: Rows) -> dict[str, float]:
        """The "next-batch" gate: the published drafter against the one it replaced, on the
        newest batch's rows (the last `fresh` of the buffer's `rows`: neither has trained on
        them); rolls back to the replaced one (weights and optimizer state) where the
        published one scores lower by more than `gate_z` standard errors."""
        if self._replaced is None or fresh < self.min_gate_rows:
            return {}
        n = min(fresh, self.judge_rows)
        rows = tuple(x[-n:] for x in rows)
        before_state, before_opt = self._replaced
        self._replaced = None
        before = copy.deepcopy(net)
        before.load_state_dict(before_state)
        published_rows = gate_row_scores(net, embed, head, *rows)
        before_rows = gate_row_scores(before, embed, head, *rows)
        keep, se = gate_publishes(published_rows, before_rows, self.gate_z, self.gate_block)
        margin = float((published_rows - before_rows).mean())
        stats = {"drafter_gate_rows": float(n), "drafter_gate_se": se,
                 "drafter_published_score": float(published_rows.mean()),
                 "drafter_replaced_score": float(before_rows.mean()),
                 "drafter_gate_right": float(margin > 0), "drafter_gate_check_margin": margin,
                 "drafter_rolled_back": float(not keep)}
        if not keep:  # new weights for whoever drafts with them: a new version
            net.load_state_dict(before_state)
            self.optimizer_state = before_opt
            self.rollbacks += 1
            self.version += 1
        return stats

    def _check_last_decision(self, net: DrafterNet, embed: torch.Tensor, head: torch.Tensor,
                             rows: Rows) -> dict[str, float]:
        """Was the last gated decision right on `rows` (a batch neither drafter trained
        on)? The published-before and candidate drafters scored as the gate scores."""
        if self._last_decision is None:
            return {}
        before, candidate, published = self._last_decision
        self._last_decision = None
        judge = copy.deepcopy(net)
        scores = []
        for state in (before, candidate):
            judge.load_state_dict(state)
            scores.append(gate_score(judge, embed, head, *rows))
        margin = scores[1] - scores[0]  # > 0: the candidate was the better one
        right = margin > 0 if published else margin <= 0
        return {"drafter_gate_right": float(right), "drafter_gate_check_margin": margin}


def _cpu_state(net: DrafterNet) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def _autocast(device: torch.device, policy_dtype: torch.dtype, cpu_bf16: bool | None = None):
    """bf16 autocast for training (matmuls in bf16, softmax and the loss in float32,
    weights and AdamW state float32): on CUDA when the policy is bf16 (fp16 policies
    train in float32: no loss scaling here); on a CPU with bf16 units (AVX512-BF16, AMX)
    whatever the policy's dtype (`cpu_bf16` None), where it trains twice the rows a second
    (a 576-wide drafter over a 4,096-token draft vocabulary, 256 rows a minibatch: 39 -> 19
    ms on an AMD EPYC) and the drafter drafts in bf16 anyway (`NeuralSpeculator.
    _draft_dtype`); CPUs without them train in float32 (emulated bf16 is slower)."""
    if device.type == "cuda" and policy_dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def gate_row_scores(net: DrafterNet, embed: torch.Tensor, head: torch.Tensor, h, tok, target,
                    chunk: int = 256) -> torch.Tensor:
    """The publish gate's score of `net` on each held-out row [rows] (CPU, float32): the
    acceptance of a distribution draft at the first position, sum_v min(p_v, q_v), with
    the policy's p over the draft vocabulary's head rows `head` [|S|, d] (the
    distribution training targets; the same for every candidate, so the comparison is
    fair)."""
    head = head.float()
    out = []
    for s in range(0, len(tok), chunk):
        p = torch.softmax(target[s:s + chunk].float() @ head.T, dim=-1)
        y = net(h[s:s + chunk].float(), embed.detach().index_select(0, tok[s:s + chunk]).float())
        q = torch.softmax(y.float() @ head.T, dim=-1)
        out.append(torch.minimum(p, q).sum(-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def gate_score(net: DrafterNet, embed: torch.Tensor, head: torch.Tensor, h, tok, target,
               chunk: int = 256) -> float:
    """The mean of `gate_row_scores`: the gate's score of `net` on held-out rows."""
    rows = gate_row_scores(net, embed, head, h, tok, target, chunk)
    return float(rows.mean()) if len(rows) else 0.0


def gate_publishes(candidate: torch.Tensor, published: torch.Tensor, z: float,
                   block: int = 32) -> tuple[bool, float]:
    """The gate's decision on the two drafters' per-row scores of the same held-out rows
    (`gate_row_scores`): publish unless the candidate's mean falls below the published
    drafter's by more than `z` standard errors of the paired difference (z = 0: unless it
    is lower at all). Returns (publish, the standard error)."""
    diff = candidate - published
    se = paired_se(diff, block)
    margin = float(diff.mean()) if len(diff) else 0.0
    return (margin > -z * se if z > 0 else margin > 0), se


def paired_se(diff: torch.Tensor, block: int = 32) -> float:
    """The standard error of mean(diff) over rows, from the spread of its means over
    blocks of `block` consecutive rows (the rows of one completion are correlated); 0
    with fewer than two blocks."""
    n = len(diff) // block
    if n < 2:
        return 0.0
    means = diff[: n * block].view(n, block).mean(1)
    return float(means.std() / n ** 0.5)


def distill_loss(net: DrafterNet, embed: torch.Tensor, h, tok, target, head,
                 kind: str = "tv") -> torch.Tensor:
    """The drafter's q against the policy's p, both over the draft vocabulary's head rows
    `head`: the cross-entropy (``kind="ce"``), or ``"tv"``, the acceptance-targeted
    `tv_loss` (total variation plus 0.1 x the cross-entropy)."""
    y = net(h, embed.detach().index_select(0, tok).float().clone())
    with torch.no_grad():
        p = torch.softmax(target @ head.T, dim=-1)
    if kind == "tv":
        return tv_loss(y @ head.T, p.float(), torch.zeros_like(p[:, 0])).mean()
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


# --- the EAGLE-3-class drafter: acceptance-targeted loss, unrolled ----------------------


def vocab_targets(final_hidden: torch.Tensor, head: torch.Tensor, vocab: torch.Tensor,
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's p at each position, over the draft vocabulary: (p[..., vocab], the
    mass p puts outside it), from its final normed hidden states [..., d] and its full LM
    head [V, d]; in chunks of rows (a [rows, V] softmax at a time)."""
    flat = final_hidden.reshape(-1, final_hidden.shape[-1])
    p_sub, p_out = [], []
    for s in range(0, len(flat), chunk):
        p = torch.softmax((flat[s:s + chunk].float() @ head.float().T), dim=-1)
        ps = p.index_select(1, vocab)
        p_sub.append(ps)
        p_out.append((1.0 - ps.sum(-1)).clamp_min(0.0))
    shape = final_hidden.shape[:-1]
    return (torch.cat(p_sub).reshape(*shape, len(vocab)), torch.cat(p_out).reshape(shape))


def expected_length(rates: list[float]) -> float:
    """Expected tokens per verification step (accepted drafts + 1) with per-position
    acceptance rates given the earlier positions accepted: 1 + sum_k prod_{j<=k} a_j."""
    total, run = 1.0, 1.0
    for a in rates:
        run *= a
        total += run
    return total


def step_weights(steps: int, decay: float = 0.8) -> list[float]:
    """Loss weight of each draft position: position j counts only when positions < j were
    accepted, so later positions weigh less (decay^j, normalised to sum 1)."""
    w = [decay ** j for j in range(steps)]
    return [x / sum(w) for x in w]


def tv_loss(q_logits: torch.Tensor, p_sub: torch.Tensor, p_out: torch.Tensor,
            kl_weight: float = 0.1) -> torch.Tensor:
    """Per row: TV(p, q) + kl_weight * CE(p restricted to the draft vocabulary, q).

    A distribution draft is accepted with probability sum_v min(p_v, q_v) = 1 - TV(p, q),
    so TV is the acceptance-targeted loss; q lives on the draft vocabulary, so p's mass
    outside it counts in full. TV's gradient vanishes where q and p have disjoint
    support; the cross-entropy term keeps a gradient there (early in training)."""
    q = torch.softmax(q_logits.float(), dim=-1)
    tv = 0.5 * ((p_sub - q).abs().sum(-1) + p_out)
    if kl_weight:
        mass = p_sub.sum(-1, keepdim=True).clamp_min(1e-12)
        ce = -((p_sub / mass) * torch.log_softmax(q_logits.float(), dim=-1)).sum(-1)
        return tv + kl_weight * ce
    return tv


def unrolled_loss(net, aux, emb, pos, valid, head_sub: torch.Tensor, p_sub, p_out,
                  steps: int, kl_weight: float = 0.1, decay: float = 0.8):
    """The EAGLE-3 drafter's training loss on a batch of sequences (`Eagle3Net.unroll`):
    sum over draft positions j of step_weights[j] * mean over valid t of tv_loss, where
    step j at t is scored against p at position t + j + 1 (p_sub/p_out [B, T + steps, ...]
    aligned with positions; valid [B, T + steps]). Returns (loss, per-step 1 - TV)."""
    T = aux.shape[1]
    ys = net.unroll(aux, emb, pos, valid[:, :T], steps)
    total, accept = 0.0, []
    for j, (w, y) in enumerate(zip(step_weights(steps, decay), ys)):
        ok = (valid[:, j + 1:j + 1 + T] & valid[:, :T]).float()
        logits = y @ head_sub.T
        per = tv_loss(logits, p_sub[:, j + 1:j + 1 + T], p_out[:, j + 1:j + 1 + T], kl_weight)
        n = ok.sum().clamp_min(1.0)
        total = total + w * (per * ok).sum() / n
        with torch.no_grad():
            tv = tv_loss(logits.detach(), p_sub[:, j + 1:j + 1 + T], p_out[:, j + 1:j + 1 + T], 0.0)
            accept.append(float(((1.0 - tv) * ok).sum() / n))
    return total, accept


@torch.no_grad()
def unrolled_acceptance(net, aux, emb, pos, valid, head_sub, p_sub, p_out,
                        steps: int) -> dict[str, list[float]]:
    """Per draft position j on held-out sequences: the acceptance of a distribution draft
    (1 - TV), of a one-hot draft (p at q's argmax) and the one-hot ceiling (p's max over
    the whole vocabulary is not known here: the max over the draft vocabulary, or the mass
    outside it if larger, bounds it from below), given positions < j accepted."""
    T = aux.shape[1]
    ys = net.unroll(aux, emb, pos, valid[:, :T], steps)
    out = {"distribution": [], "one_hot": [], "one_hot_ceiling": [], "vocab_coverage": []}
    for j, y in enumerate(ys):
        ok = (valid[:, j + 1:j + 1 + T] & valid[:, :T])
        ps, po = p_sub[:, j + 1:j + 1 + T][ok], p_out[:, j + 1:j + 1 + T][ok]
        logits = (y @ head_sub.T)[ok]
        tv = tv_loss(logits, ps, po, 0.0)
        out["distribution"].append(float((1.0 - tv).mean()))
        out["one_hot"].append(float(ps.gather(1, logits.argmax(-1, keepdim=True)).mean()))
        out["one_hot_ceiling"].append(float(ps.max(-1).values.mean()))
        out["vocab_coverage"].append(float((1.0 - po).mean()))
    return out
