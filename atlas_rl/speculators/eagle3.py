"""The EAGLE-3-class drafter as a speculator: drafting with its own per-request keys and
values, capturing the policy's multi-layer features while it generates, and learning
online with a publish gate.

Network: `drafter_net.Eagle3Net` (one decoder layer over fused low/mid/high features).
Offline distillation: `eagle3_distill` (the static drafter). Losses: `distill.unrolled_loss`
(TV + a little cross-entropy, unrolled over draft positions: training-time test).

Per request it keeps the keys and values of the last `window` verified positions (computed
once, in `capture`, from the fused features vLLM hands over), and the last position's
input for the first draft step. Draft steps' keys live only inside `propose`, so a
rejection leaves nothing to roll back. A gap in positions (preemption) starts afresh.

Online learning (`learn`): the captured sequences (features, the policy's final hidden
states, tokens) join a replay buffer bounded in tokens; a candidate, warm-started from the
published drafter, trains on a mix of the newest batch and older rollouts within the time
budget, and is published only if it beats the published drafter's expected acceptance
length on held-out sequences of the newest batch (so adaptation cannot lose to the frozen
drafter by more than that evaluation's noise). The optimizer state carries over.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from atlas_rl.kernels.sampling import inverse_cdf
from atlas_rl.machine import cpu_has_native_bf16
from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, HiddenStateSpeculator, Stop, stopped
from atlas_rl.speculators.distill import (expected_length, unrolled_acceptance, unrolled_loss,
                                          vocab_targets)
from atlas_rl.speculators.drafter_net import Eagle3Net


class KVSlots:
    """Every live request's drafter state in one set of tensors, a slot (row) per request:
    keys/values of its last `window` verified positions, ring-indexed by position (rotary
    keys carry their position, so attention does not care about their order), the
    position each ring entry holds (-1: none), and the last position's fused feature and
    sampled token (the first draft step's input). One capture writes every request's new
    rows with one scatter; one propose gathers the drafting requests' slots."""

    def __init__(self, window: int, kv_heads: int, head_dim: int, hidden_size: int,
                 capacity: int = 8):
        self.window = window
        self._shape = (window, kv_heads, head_dim)
        self.hidden_size = hidden_size
        self.slot: dict[object, int] = {}
        self.next_pos: dict[object, int] = {}
        self._free: list[int] = []
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "k", None)
        k = torch.zeros((capacity,) + self._shape)
        fields = {"k": k, "v": torch.zeros_like(k),
                  "stored": torch.full((capacity, self.window), -1, dtype=torch.long),
                  "hidden": torch.zeros((capacity, self.hidden_size)),
                  "token": torch.zeros(capacity, dtype=torch.long),
                  "pos": torch.zeros(capacity, dtype=torch.long)}
        if old is not None:
            n = old.shape[0]
            for name, t in fields.items():
                t[:n] = getattr(self, name)
            self._free.extend(range(capacity - 1, n - 1, -1))
        else:
            self._free = list(range(capacity - 1, -1, -1))
        for name, t in fields.items():
            setattr(self, name, t)

    def __contains__(self, key) -> bool:
        return key in self.slot

    def __len__(self) -> int:
        return len(self.slot)

    def acquire(self, key, first_pos: int) -> int:
        """`key`'s slot, emptied when the request is new or its positions jumped (a
        preemption recomputes elsewhere: start afresh)."""
        s = self.slot.get(key)
        if s is None:
            if not self._free:
                self._alloc(2 * self.k.shape[0])
            s = self.slot[key] = self._free.pop()
            self.stored[s] = -1
        elif self.next_pos[key] != first_pos:
            self.stored[s] = -1
        return s

    def release(self, key) -> None:
        s = self.slot.pop(key, None)
        self.next_pos.pop(key, None)
        if s is not None:
            self._free.append(s)

    def clear(self) -> None:
        for key in list(self.slot):
            self.release(key)

    def keys_of(self, key) -> torch.Tensor:
        """`key`'s stored keys, oldest first (for tests and inspection)."""
        s = self.slot[key]
        order = torch.argsort(self.stored[s])
        return self.k[s][order][self.stored[s][order] >= 0]


@dataclass
class Eagle3Stream:
    """One request's captured rows since its last gap (for learning)."""

    start: int
    aux: list[torch.Tensor] = field(default_factory=list)
    final: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    next_pos: int = 0


class Eagle3Speculator(HiddenStateSpeculator):
    """Drafts with `Eagle3Net`; learns online from captured features unless ``frozen``."""

    name = "eagle3"
    uses_aux_hidden_states = True

    def __init__(self, net: Eagle3Net | None = None, vocab: torch.Tensor | None = None,
                 aux_layers: Sequence[int] = (), lr: float = 3e-4, frozen: bool = False,
                 steps: int = 3, max_buffer_tokens: int = 100_000, batch_rollouts: int = 8,
                 holdout_fraction: float = 0.15, seed: int = 0, gate: bool = True):
        self.net, self.vocab = net, vocab
        self.gate = bool(gate)  # publish only a candidate that beats the published drafter
        self.aux_layers = tuple(int(x) for x in aux_layers)
        self.lr, self.frozen, self.steps = float(lr), bool(frozen), int(steps)
        self.max_buffer_tokens, self.batch_rollouts = int(max_buffer_tokens), int(batch_rollouts)
        self.holdout_fraction = float(holdout_fraction)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(seed)
        self._rng = random.Random(seed)
        self._embed = self._head = None
        self._head_sub_t = None
        self._train_head: torch.Tensor | None = None  # the head rows learn() trains against
        self._slots: KVSlots | None = None  # per-request keys/values (made on first use)
        self._streams: dict[object, Eagle3Stream] = {}
        self._done: list[Eagle3Stream] = []
        # (stream, first row, rows) of this step, filled in by `_stream_tensors`
        self._pending_streams: list[tuple[Eagle3Stream, int, int]] = []
        self._buffer: deque = deque()   # (aux, final, tokens, start) per rollout
        self._buffer_tokens = 0
        self._optimizer_state = None
        self.version = 0
        self.rollbacks = 0            # candidates not published (worse, or diverged)
        self.meta: dict = {}
        # Matmul dtype of drafting and capture (None: `_draft_dtype` decides); softmax,
        # sampling and q stay float32, so verification is exact whatever this is.
        self.draft_dtype: torch.dtype | None = None
        self._head_draft: tuple | None = None  # (dtype, rows in it, the float32 rows)

    # --- the target's tensors ---------------------------------------------------------

    @classmethod
    def from_dir(cls, directory, **kwargs) -> "Eagle3Speculator":
        spec = cls(**kwargs)
        spec.load(directory)
        return spec

    def attach_target(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        if self.net is None:
            raise ValueError("the EAGLE-3 drafter has no weights: load a static drafter "
                             "(`python -m atlas_rl.speculators.eagle3_distill`) first")
        if embed.shape[-1] != self.net.hidden_size:
            raise ValueError(f"the EAGLE-3 drafter was trained for hidden size "
                             f"{self.net.hidden_size}, but the policy's is {embed.shape[-1]}")
        self._embed, self._head = embed, head
        self.net.to(embed.device)
        self._head_sub_t = None

    def weights_synced(self) -> None:
        self._head_sub_t = None

    @property
    def ready(self) -> bool:
        return self._embed is not None and self.net is not None

    def _sub_head_t(self) -> torch.Tensor:
        if self._head_sub_t is None:
            self._vocab_dev = self.vocab.to(self._head.device)
            self._head_sub_t = self._head.detach().index_select(0, self._vocab_dev).float().t().contiguous()
        return self._head_sub_t

    def _draft_dtype(self) -> torch.dtype:
        """bfloat16 on a CPU with bf16 units (AVX512-BF16, AMX): a draft position reads
        the layer's and the head's weights, ~40 MB in float32 for a 576-wide policy with an
        8,192-token draft vocabulary, and on 2 cores that read is most of its cost); a
        bf16/fp16 policy's own dtype on CUDA; float32 otherwise, or with
        ``draft_dtype = torch.float32``."""
        if self.draft_dtype is not None:
            return self.draft_dtype
        if self._head is not None and self._head.is_cuda:
            return self._head.dtype if self._head.dtype in (torch.bfloat16, torch.float16) \
                else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def _draft_head_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The draft vocabulary's head rows, transposed, in the drafting dtype."""
        head_t = self._sub_head_t()
        if dtype == head_t.dtype:
            return head_t
        if self._head_draft is None or self._head_draft[0] != dtype \
                or self._head_draft[2] is not head_t:
            self._head_draft = (dtype, head_t.to(dtype).contiguous(), head_t)
        return self._head_draft[1]

    def draft_head_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._head is None:
            return None
        rows = self._sub_head_t().t()
        return self._vocab_dev, rows

    def _emb(self, tokens, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = tokens if torch.is_tensor(tokens) else torch.tensor(tokens, dtype=torch.long)
        return self._embed.index_select(0, idx.to(self._embed.device)).to(dtype)

    # --- capture ------------------------------------------------------------------------

    def capture(self, key, hidden: torch.Tensor, tokens: Sequence[int], first_pos: int,
                aux: torch.Tensor | None = None) -> None:
        """`hidden[i]`: the policy's final hidden state at position first_pos + i, from
        which it sampled tokens[i]; `aux[i]`: its features at `aux_layers` there."""
        self.capture_batch([key], hidden, [tokens], [first_pos], [0], aux=aux)

    @torch.inference_mode()
    def capture_batch(self, keys, hidden: torch.Tensor, tokens, first_positions, offsets,
                      aux: torch.Tensor | None = None) -> None:
        """A step's rows of every request at once: request i's rows are
        ``offsets[i] : offsets[i] + len(tokens[i])`` of `hidden` and `aux`. One fusion,
        one key/value projection and one scatter for the whole step."""
        if aux is None or not self.ready:
            return
        slots = self._kv_slots()
        w = slots.window
        rows, req_slot, positions, toks, last_rows = [], [], [], [], []
        for key, sampled, first, off in zip(keys, tokens, first_positions, offsets):
            m = len(sampled)
            if not m:
                continue
            slot = slots.acquire(key, first)
            slots.next_pos[key] = first + m
            keep = max(0, m - w)  # older rows would fall out of the window at once
            rows.extend(range(off + keep, off + m))
            req_slot.extend([slot] * (m - keep))
            positions.extend(range(first + keep, first + m))
            toks.extend(int(t) for t in sampled[keep:])
            last_rows.append((slot, len(rows) - 1))
            if not self.frozen:
                self._stream_rows(key, first, sampled, off)
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long)
        dtype = self._draft_dtype()
        a = aux.index_select(0, idx).to(dtype)
        pos = torch.tensor(positions, dtype=torch.long)
        tok = torch.tensor(toks, dtype=torch.long)
        g = self.net.fuse(a)
        k, v = self.net.kv(g, self._emb(tok, dtype), pos)
        slot_t = torch.tensor(req_slot, dtype=torch.long)
        ring = pos % w
        slots.k[slot_t, ring] = k.to(slots.k.dtype)
        slots.v[slot_t, ring] = v.to(slots.v.dtype)
        slots.stored[slot_t, ring] = pos
        last_slot = torch.tensor([s for s, _ in last_rows], dtype=torch.long)
        last = torch.tensor([r for _, r in last_rows], dtype=torch.long)
        slots.hidden[last_slot] = g[last].to(slots.hidden.dtype)
        slots.token[last_slot] = tok[last]
        slots.pos[last_slot] = pos[last]
        if not self.frozen:
            self._stream_tensors(hidden, aux)

    def _stream_rows(self, key, first: int, sampled, off: int) -> None:
        m = len(sampled)
        stream = self._streams.get(key)
        if stream is None or stream.next_pos != first:
            if stream is not None:
                self._done.append(stream)
            stream = self._streams[key] = Eagle3Stream(first, next_pos=first)
        stream.tokens.extend(int(t) for t in sampled)
        stream.next_pos = first + m
        self._pending_streams.append((stream, off, m))

    def _stream_tensors(self, hidden: torch.Tensor, aux: torch.Tensor) -> None:
        """The learning copies of this step's rows (bfloat16), one conversion per step."""
        aux_b = aux.detach().to(torch.bfloat16)
        final_b = hidden.detach().to(torch.bfloat16)
        for stream, off, m in self._pending_streams:
            stream.aux.append(aux_b[off:off + m])
            stream.final.append(final_b[off:off + m])
        self._pending_streams = []

    def _kv_slots(self) -> KVSlots:
        if self._slots is None or self._slots.window != self.net.window:
            net = self.net
            self._slots = KVSlots(net.window, net.num_kv_heads, net.head_dim, net.hidden_size)
        return self._slots

    def finish(self, key) -> None:
        if self._slots is not None:
            self._slots.release(key)
        stream = self._streams.pop(key, None)
        if stream is not None:
            self._done.append(stream)

    def begin_batch(self) -> None:
        if self._slots is not None:
            self._slots.clear()

    # --- drafting ---------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, keys, contexts, max_lengths, sample: Sequence[bool] | None = None) -> list[Draft]:
        drafts = [EMPTY_DRAFT] * len(keys)
        slots = self._slots
        if not self.ready or slots is None:
            return drafts
        rows = [i for i, (k, n) in enumerate(zip(keys, max_lengths)) if n > 0 and k in slots]
        if not rows:
            return drafts
        net = self.net
        dtype = self._draft_dtype()
        head_t, vocab = self._draft_head_t(dtype), self._vocab_dev
        slot = torch.tensor([slots.slot[keys[i]] for i in rows], dtype=torch.long)
        B = len(rows)
        lens = [max_lengths[i] for i in rows]
        L, w = max(lens), slots.window
        # the window's keys/values, then room for this proposal's own draft steps
        K = torch.empty((B, w + L - 1) + slots.k.shape[2:], dtype=dtype)
        V = torch.empty_like(K)
        K[:, :w], V[:, :w] = slots.k[slot], slots.v[slot]
        pos = slots.pos[slot]
        stored = slots.stored[slot]
        mask = torch.ones((B, w + L - 1), dtype=torch.bool)
        mask[:, :w] = (stored >= 0) & (stored > (pos - w)[:, None])
        hidden, tok = slots.hidden[slot].to(dtype), slots.token[slot]
        flags = [bool(sample[i]) if sample is not None else False for i in rows]
        any_sample = any(flags)
        do_sample = torch.tensor(flags, dtype=torch.bool)
        toks, confs, qs = [], [], []
        for j in range(L):
            e = self._emb(tok, dtype)
            if j:  # this draft step's own key and value (training: `Eagle3Net.unroll`)
                K[:, w + j - 1], V[:, w + j - 1] = net.kv(hidden, e, pos + j)
            n = w + j
            q = net.query(hidden, e, pos + j)
            hidden, y = net.finish(hidden, net.attend(q, K[:, :n], V[:, :n], mask[:, :n]))
            probs = torch.softmax((y @ head_t).float(), dim=-1)
            idx = probs.argmax(-1)
            if any_sample:
                u = torch.rand(B, generator=self._generator)
                idx = torch.where(do_sample, inverse_cdf(probs, u, torch.float32), idx)
            toks.append(idx)
            confs.append(probs.gather(1, idx[:, None]).squeeze(1))
            if any_sample:
                qs.append(probs)
            tok = vocab[idx]
        toks = vocab[torch.stack(toks, 1)].tolist()
        confs = torch.stack(confs, 1).tolist()
        qs = torch.stack(qs, 1) if any_sample else None
        for b, i in enumerate(rows):
            n = lens[b]
            drafts[i] = Draft(toks[b][:n], confs[b][:n],
                              q_ids=vocab.expand(n, -1) if flags[b] else None,
                              q=qs[b, :n] if flags[b] else None)
        return drafts

    # --- learning ---------------------------------------------------------------------

    def take_captured(self) -> list | None:
        """The captured rollouts since the last call, as (aux, final, tokens, start)
        tensors per rollout (at least steps + 2 positions), or None; emptied."""
        streams = self._done + list(self._streams.values())
        self._done, self._streams = [], {}
        out = []
        for s in streams:
            if len(s.tokens) < self.steps + 2:
                continue
            out.append((torch.cat(s.aux), torch.cat(s.final), torch.tensor(s.tokens), s.start))
        return out or None

    def add_captured(self, rollouts) -> None:
        for r in rollouts or ():
            self._buffer.append(r)
            self._buffer_tokens += len(r[2])
        while self._buffer_tokens > self.max_buffer_tokens and len(self._buffer) > 1:
            self._buffer_tokens -= len(self._buffer.popleft()[2])

    def _batch(self, rollouts):
        """Training tensors for `unrolled_loss` from (aux, final, tokens, start) rollouts."""
        steps = self.steps
        M = max(len(r[2]) for r in rollouts)
        B = len(rollouts)
        d = self.net.hidden_size
        aux = torch.zeros((B, M, rollouts[0][0].shape[1]))
        final = torch.zeros((B, M + steps, d))
        tok = torch.zeros((B, M + steps - 1), dtype=torch.long)
        pos = torch.zeros((B, M), dtype=torch.long)
        valid = torch.zeros((B, M + steps), dtype=torch.bool)
        for b, (a, f, t, start) in enumerate(rollouts):
            n = len(t)
            aux[b, :n], final[b, :n], tok[b, :n] = a.float(), f.float(), t
            pos[b] = start + torch.arange(M)
            valid[b, :n] = True
        emb = self._emb(tok.flatten()).view(B, -1, d).clone()
        p_sub, p_out = vocab_targets(final, self._head.detach(), self._vocab_dev)
        return aux, emb, pos, valid, p_sub, p_out

    def _score(self, net, held) -> float:
        """Expected acceptance length of distribution drafts on held-out rollouts."""
        was = net.training
        net.eval()
        acc = unrolled_acceptance(net, *held[:4], self._train_head.t(), held[4], held[5],
                                  self.steps)
        net.train(was)
        return expected_length(acc["distribution"])

    def learn(self, sequences=(), time_budget: float | None = None,
              stop: Stop | None = None) -> dict[str, float]:
        if self.frozen or not self.ready:
            self._done, self._streams = [], {}
            return {}
        start = time.perf_counter()
        new = self.take_captured() or []
        if not new:
            return {}
        # a copy made here: tensors made under inference mode (vLLM's weights, drafting's
        # caches) cannot be saved for backward
        self._train_head = self._sub_head_t().clone()
        self._rng.shuffle(new)
        n_held = max(1, int(round(self.holdout_fraction * len(new)))) if len(new) > 1 else 0
        held_rollouts, fresh = new[:n_held], new[n_held:]
        older = list(self._buffer)
        self.add_captured(fresh)
        if not fresh or not held_rollouts:
            return {"drafter_update_skipped": 1.0}
        held = self._batch(held_rollouts)
        published_score = self._score(self.net, held)
        candidate = copy.deepcopy(self.net)
        candidate.__dict__.pop("_weights_t", None)  # drafting caches: rebuilt on use
        opt = torch.optim.AdamW(candidate.parameters(), lr=self.lr, weight_decay=0.0)
        if self._optimizer_state is not None:
            opt.load_state_dict(self._optimizer_state)
        losses, slowest, diverged = [], 0.0, False
        while True:  # newest rollouts first, each minibatch half new, half replayed
            t0 = time.perf_counter()
            if (time_budget is not None and (t0 - start + slowest > time_budget)
                    or stopped(stop)):
                break
            half = max(1, self.batch_rollouts // 2)
            part = self._rng.sample(fresh, min(half, len(fresh)))
            if older:
                part += self._rng.sample(older, min(self.batch_rollouts - len(part), len(older)))
            loss = self._loss(candidate, part)
            value = float(loss.detach())
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(candidate.parameters(), 1.0)
            opt.step()
            losses.append(value)
            slowest = max(slowest, time.perf_counter() - t0)
            if time_budget is None and len(losses) >= max(1, len(fresh) // half):
                break  # one pass over the newest rollouts without a budget
        stats = {"drafter_train_seconds": time.perf_counter() - start,
                 "drafter_rows": float(sum(len(r[2]) for r in fresh)),
                 "drafter_buffer_rows": float(self._buffer_tokens),
                 "drafter_published_score": published_score}
        if losses:
            stats["drafter_loss"] = sum(losses) / len(losses)
        if not losses or diverged:
            self.rollbacks += int(diverged)
            return {**stats, "drafter_rollback": float(diverged),
                    "drafter_rollbacks": float(self.rollbacks), "drafter_version": float(self.version)}
        score = self._score(candidate, held)
        stats["drafter_candidate_score"] = score
        if score > published_score or not self.gate:
            self.net.load_state_dict(candidate.state_dict())
            self._optimizer_state = opt.state_dict()
            self.version += 1
            stats["drafter_published"] = 1.0
        else:
            self.rollbacks += 1  # a candidate that does not beat the published drafter
            stats["drafter_published"] = 0.0
        stats["drafter_version"] = float(self.version)
        stats["drafter_rollbacks"] = float(self.rollbacks)
        return stats

    def _loss(self, net, rollouts):
        aux, emb, pos, valid, p_sub, p_out = self._batch(rollouts)
        loss, _ = unrolled_loss(net, aux, emb, pos, valid, self._train_head.t(), p_sub, p_out,
                                self.steps)
        return loss

    def published(self) -> dict:
        return {"net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "version": self.version, "rollbacks": self.rollbacks}

    def load_published(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.version, self.rollbacks = state["version"], state["rollbacks"]

    # --- state ------------------------------------------------------------------------

    def state(self):
        if self.net is None:
            return {}, {"empty": True}
        tensors = {f"net.{k}": v.detach().cpu().float().clone()
                   for k, v in self.net.state_dict().items()}
        tensors["vocab"] = self.vocab.clone()
        meta = {**self.meta, "net": self.net.config(), "aux_layers": list(self.aux_layers),
                "draft_vocab_size": int(len(self.vocab)), "version": self.version,
                "rollbacks": self.rollbacks}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        if meta.get("empty"):
            return
        net = Eagle3Net(**meta["net"])
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net, self.vocab = net, tensors["vocab"].long()
        self.aux_layers = tuple(int(x) for x in meta["aux_layers"])
        self.version = int(meta.get("version", 0))
        self.rollbacks = int(meta.get("rollbacks", 0))
        self.meta = {k: v for k, v in meta.items()
                     if k not in ("net", "aux_layers", "version", "rollbacks", "name")}
        self._optimizer_state = None
        if self._embed is not None:
            self.attach_target(self._embed, self._head)


def is_eagle3_dir(directory) -> bool:
    from pathlib import Path

    path = Path(directory) / "eagle3.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("name") == "eagle3"
