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

Three rooms: the network (`drafter_net.DrafterNet`), this module (drafting, and capturing
the policy's hidden states while it generates), and the distillation side
(`distill.Distiller`: buffer, budgeted training with rollback, evaluation). The training
inputs come for free during generation: vLLM hands the proposer the hidden states at the
positions it sampled from, and we keep them per request (``capture``). Offline,
`atlas-rl train-speculator` (`atlas_rl.train_speculator`) collects them the same way.

Drafting from a distribution: with ``sample=True`` a draft token is sampled from q and q
goes to the verifier (accepted with probability 1 - TV(p, q)); otherwise the draft is
q's argmax, one-hot (accepted with probability p(x)). ``propose_both`` drafts each
request both ways in one pass, and the controller keeps per request the kind its
calibration values more.

Devices: the drafter lives where the policy's embedding does (``attach_target``). On CUDA
with a bf16 policy, and on a CPU with bf16 units whatever the policy's dtype, it drafts
with bf16 matmuls (softmax and sampling in float32) and trains with float32 weights under
bf16 autocast; on other CPUs everything is float32. The
drafting step waits for the device once per `propose` call: the Draft contract hands
tokens and confidences back as Python lists (docs/gpu.md lists the host syncs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from atlas_rl.kernels.gemm import PackedLinear
from atlas_rl.kernels.graphs import GraphCache, bucket
from atlas_rl.kernels.rejection import cuda_graphs_enabled
from atlas_rl.kernels.sampling import inverse_cdf
from atlas_rl.kernels.staging import staged_on, to_device
from atlas_rl.machine import cpu_has_native_bf16
from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, HiddenStateSpeculator, Stop
from atlas_rl.speculators.distill import Distiller, Rows, acceptance
from atlas_rl.speculators.drafter_net import DrafterNet


#: Static drafters shipped with atlas-rl, by model short name (`atlas-rl models`).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "speculators"


def static_speculator_dir(setting: str | None, model_path: str,
                          drafter: str = "auto") -> Path | None:
    """Where the static drafter for `model_path` lives, per AtlasConfig.static_speculator
    ('auto': the bundled one for the model, or for the known model it was derived from
    (`atlas_rl.models.base_model_name`), if any; 'none'/None: no static drafter). A
    directory holds an MLP drafter (neural.json), an EAGLE-3 one (eagle3.json) or both;
    `drafter` ('mlp', 'eagle3', 'auto') says which one must be there."""
    if setting is None or str(setting).lower() in ("", "none"):
        return None
    wanted = {"mlp": ("neural.json",), "eagle3": ("eagle3.json",)}.get(
        drafter, ("eagle3.json", "neural.json"))
    if setting == "auto":  # the model's own bundled drafter, else its base model's
        from atlas_rl.models import base_model_name

        for name in (Path(str(model_path)).name, base_model_name(model_path)):
            d = BUNDLED_DIR / str(name)
            if name and any((d / f).is_file() for f in wanted):
                return d
        return None
    d = Path(setting).expanduser()
    if not any((d / f).is_file() for f in wanted):
        raise FileNotFoundError(
            f"static_speculator {setting!r} has no {' or '.join(wanted)}: pass the --out "
            f"directory of `atlas-rl train-speculator` (MLP) or of `python -m "
            f"atlas_rl.speculators.eagle3_distill` (EAGLE-3), 'auto' (the bundled drafter) "
            f"or 'none'")
    return d


class DraftTensors(NamedTuple):
    """A batch of drafts on the device (`NeuralSpeculator.draft_tensors`)."""

    ids: torch.Tensor      # [n, steps] int64 token ids
    confs: torch.Tensor    # [n, steps] float32 q of each drafted token
    qs: torch.Tensor       # [n, steps, |draft vocabulary|] float32 q
    packed: torch.Tensor   # [2, n, steps] float64: ids and confs (one copy to the host)
    support: torch.Tensor  # [|draft vocabulary|] the token id of each column of qs


@dataclass
class CapturedStream:
    """One request's captured hidden states since its last gap: ``hidden[i]`` was
    computed at position ``first_pos + i`` and ``tokens[i]`` sampled from it."""

    next_pos: int
    hidden: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class NeuralSpeculator(HiddenStateSpeculator):
    """Drafts with `DrafterNet`; learns online from the hidden states the policy computed
    while generating (unless ``frozen``)."""

    name = "neural"

    def __init__(self, draft_vocab_size: int = 4096, lr: float = 1e-3,
                 max_buffer_rows: int = 16384, batch_rows: int = 256, max_epochs: int = 2,
                 frozen: bool = False, seed: int = 0, gate: str | bool = "next-batch",
                 loss: str = "tv"):
        if draft_vocab_size < 2:
            raise ValueError(f"draft_vocab_size must be >= 2, got {draft_vocab_size}")
        self.draft_vocab_size = int(draft_vocab_size)
        self.frozen = bool(frozen)
        self.distiller = Distiller(lr, max_buffer_rows, batch_rows, max_epochs, gate=gate,
                                   loss=loss)
        self.net: DrafterNet | None = None
        self.vocab: torch.Tensor | None = None  # draft vocabulary (token ids), sorted
        self._embed = self._head = self._head_sub = None
        self._head_linear: PackedLinear | None = None  # the head rows, packed for drafting
        self._head_stale = True  # the draft vocabulary's head rows need a refresh
        self.draft_dtype: torch.dtype | None = None  # None: `_draft_dtype` decides
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(seed)
        self._device_generator: torch.Generator | None = None  # sampling drafts on CUDA
        # the drafting loop as a CUDA graph per batch bucket: None = on CUDA (True on the
        # CPU runs the same static buffers eagerly: what the CPU tests check)
        self.graphs: bool | None = None
        self._graphs = GraphCache(max_graphs=32)
        self._graph_tag = None  # the weights the cached graphs read
        # key -> (hidden block, row of its last captured state, last token)
        self._last: dict[object, tuple[torch.Tensor, int, int]] = {}
        self._streams: dict[object, CapturedStream] = {}
        self._done: list[CapturedStream] = []  # finished streams waiting for learn()
        # How often each token was sampled in the rollouts (decayed per batch): the
        # draft vocabulary is re-chosen from it as the policy and the prompts move.
        self.token_counts: torch.Tensor | None = None
        self.vocab_source = "none"  # "all" | "rollouts" | "static" (a loaded drafter)
        self._foreign_tokens: list[torch.Tensor] = []  # other ranks' sampled tokens
        self._vocab_stats: dict[str, float] = {}

    @property
    def version(self) -> int:
        """Bumped whenever new drafter weights are published."""
        return self.distiller.version

    @property
    def rollbacks(self) -> int:
        return self.distiller.rollbacks

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
        V = int(head.shape[0])
        if self.vocab is None and self.draft_vocab_size >= V:
            self.vocab, self.vocab_source = torch.arange(V), "all"
        # else: no draft vocabulary until the first batch of rollouts chooses one
        # (`learn`): token ids 0..k-1 are no guess for an unknown tokenizer (byte and
        # special tokens lead many vocabularies), and an untrained drafter drafts nothing
        # worth verifying anyway
        if self.token_counts is None or self.token_counts.numel() != V:
            self.token_counts = torch.zeros(V)
        if self.vocab is not None and int(self.vocab.max()) >= V:
            raise ValueError(f"the drafter's vocabulary has token ids up to "
                             f"{int(self.vocab.max())}, beyond the policy's {int(head.shape[0])}")
        self._head_stale = True

    def weights_synced(self) -> None:
        self._head_stale = True

    @property
    def ready(self) -> bool:
        return self._embed is not None and self.net is not None and self.vocab is not None

    def _draft_dtype(self) -> torch.dtype:
        """Matmul dtype for drafting (the softmax and the sampling stay float32): a
        bf16/fp16 policy's own dtype on CUDA (tensor cores); on a CPU with bf16 units
        (AVX512-BF16, AMX) bf16 whatever the policy's dtype (a draft position reads half
        the bytes: 2.0 -> 1.4 ms at 4 requests with cold caches on 2 cores, and drafting
        runs between forwards that evict every cache); float32 otherwise, or with
        ``draft_dtype = torch.float32``. Verification is exact whatever q's precision: the q
        handed over is the one the drafts were sampled from."""
        if self.draft_dtype is not None:
            return self.draft_dtype
        dtype = self._head.dtype
        if self._head.is_cuda and dtype in (torch.bfloat16, torch.float16):
            return dtype
        if not self._head.is_cuda and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32

    def _sub_head(self) -> torch.Tensor:
        if self._head_stale or self._head_sub is None:
            # self.vocab stays on the CPU (saved state, set_vocab_from_counts)
            self._vocab_dev = to_device(self.vocab, None, self._head.device)
            self._head_sub = self._head.detach().index_select(0, self._vocab_dev).float()
            # for drafting: the rows in the drafting dtype, packed once (kernels.gemm)
            self._head_sub_t = self._head_sub.to(self._draft_dtype()).contiguous()
            self._head_linear = PackedLinear(self._head_sub_t)
            self._head_stale = False
        return self._head_sub

    def draft_head_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._head is None or self.vocab is None:  # no draft vocabulary chosen yet
            return None
        rows = self._sub_head()
        return self._vocab_dev, rows

    def head_logits(self, y: torch.Tensor) -> torch.Tensor:
        """The draft vocabulary's logits of drafter outputs ``y`` [rows, d] (in the
        drafting dtype; `_sub_head` must have run)."""
        return self._head_linear(y)

    def set_vocab_from_counts(self, counts: torch.Tensor) -> None:
        """Draft vocabulary = the `draft_vocab_size` most frequent tokens of `counts` [V]."""
        k = min(self.draft_vocab_size, counts.numel())
        self.vocab = torch.sort(torch.topk(counts.float(), k).indices).values
        self._head_stale = True

    # The draft vocabulary follows the rollouts: token counts decay by this factor per
    # batch (a half-life of ~2 batches), and the vocabulary is re-chosen when the most
    # frequent tokens would cover this much more of the counted mass than it does.
    COUNT_DECAY = 0.7
    REFRESH_MARGIN = 0.01

    def observe_tokens(self, tokens: torch.Tensor) -> dict[str, float]:
        """Count a batch's sampled tokens and re-choose the draft vocabulary where the
        counts say it no longer covers them (not for a frozen drafter). Returns the
        coverage: the share of these tokens inside the draft vocabulary in force while
        they were drafted, and whether it was re-chosen."""
        if self.token_counts is None or not tokens.numel():
            return {}
        V = self.token_counts.numel()
        tokens = tokens[(tokens >= 0) & (tokens < V)]
        in_vocab = None
        if self.vocab is not None:
            in_vocab = torch.zeros(V, dtype=torch.bool)
            in_vocab[self.vocab] = True
        stats = {"draft_vocab_coverage": float(in_vocab[tokens].float().mean())
                 if in_vocab is not None else 0.0}
        if self.frozen or self.vocab_source == "all":
            return stats
        if self.vocab is not None and not bool(self.token_counts.any()):
            # a prior for the vocabulary in force (a static drafter's, chosen on broad
            # data): one count per token, so that one batch does not replace it whole
            self.token_counts[self.vocab] = 1.0
        self.token_counts.mul_(self.COUNT_DECAY).add_(torch.bincount(tokens, minlength=V).float())
        total = float(self.token_counts.sum())
        k = min(self.draft_vocab_size, V)
        best = float(torch.topk(self.token_counts, k).values.sum()) / total
        have = float(self.token_counts[in_vocab].sum()) / total if in_vocab is not None else 0.0
        refreshed = best - have > self.REFRESH_MARGIN
        if refreshed:
            self.set_vocab_from_counts(self.token_counts)
            self.vocab_source = "rollouts"
            have = best
        stats.update(draft_vocab_refreshed=float(refreshed), draft_vocab_counted_coverage=have)
        return stats

    # --- hidden states seen during generation -------------------------------------------

    def capture(self, key, hidden: torch.Tensor, tokens: Sequence[int], first_pos: int) -> None:
        """The policy computed ``hidden[i]`` at position ``first_pos + i`` and sampled
        ``tokens[i]`` (the token at position ``first_pos + i + 1``) from it. The rows
        are kept as given: callers pass memory they own (vLLM reuses its buffers, so the
        proposer copies each step's block once)."""
        self.capture_batch([key], hidden, [tokens], [first_pos], [0])

    def capture_batch(self, keys, hidden, tokens, first_positions, offsets, aux=None) -> None:
        """`capture` for a step's block: each request's last row is kept as (block, row),
        not sliced out (drafting gathers the rows of a batch in one op, `_last_rows`)."""
        hidden = hidden.detach().float()
        for key, toks, first, off in zip(keys, tokens, first_positions, offsets):
            n = len(toks)
            if not n:
                continue
            self._last[key] = (hidden, off + n - 1, int(toks[-1]))
            if not self.frozen:
                self._stream(key, hidden[off:off + n], toks, first)

    def _last_rows(self, keys) -> torch.Tensor:
        """The captured last hidden state of each of ``keys`` [n, d]: a view where they sit
        in one block in order (every request's first step after a step without drafts),
        one gather where they are in one block, else a stack."""
        last = [self._last[k] for k in keys]
        block, first = last[0][0], last[0][1]
        if all(b is block for b, _, _ in last):
            rows = [r for _, r, _ in last]
            if rows == list(range(first, first + len(rows))):
                return block[first:first + len(rows)]
            return block.index_select(0, to_device(rows, torch.long, block.device))
        return torch.stack([b[r] for b, r, _ in last])

    def _stream(self, key, hidden: torch.Tensor, tokens, first_pos: int) -> None:
        stream = self._streams.get(key)
        if stream is None or stream.next_pos != first_pos:  # a gap (preemption): new segment
            if stream is not None:
                self._done.append(stream)
            stream = self._streams[key] = CapturedStream(first_pos)
        stream.hidden.append(hidden)
        stream.tokens.extend(int(t) for t in tokens)
        stream.next_pos = first_pos + len(tokens)

    def finish(self, key) -> None:
        self._last.pop(key, None)
        stream = self._streams.pop(key, None)
        if stream is not None:
            self._done.append(stream)

    def begin_batch(self) -> None:
        self._last.clear()

    # --- drafting ---------------------------------------------------------------------

    def propose(self, keys, contexts, max_lengths, sample: Sequence[bool] | None = None) -> list[Draft]:
        flags = [bool(sample[i]) if sample is not None else False for i in range(len(keys))]
        return self._propose(keys, max_lengths, [flags])[0]

    #: Each request drafted both ways in one batched pass, its rows twice (argmax and
    #: sampled): the controller then keeps per request the kind its calibration values
    #: more, where one kind per step locked onto one-hot drafts that it cut more often
    #: (the domain gap in bfloat16 on an Intel Xeon, 2026-12-05: 46-75% of request-steps
    #: drafted against 91-98% for the drafter drafting distributions). At a tail's few
    #: requests the pass is bound by reading the head, so twice the rows cost little more:
    #: 4 requests x 3 positions in bfloat16 on that Xeon, 1.62 ms one kind, 1.88 ms both;
    #: 16 requests 2.00 ms and 2.57 ms. Past 16 requests the matrix products, not the head's
    #: read, set the time, and twice the rows cost up to twice as much: one kind per step.
    drafts_both_kinds = True
    both_kinds_max_batch = 16

    def propose_both(self, keys, contexts, max_lengths) -> list[tuple[Draft, Draft]]:
        """Per request its one-hot draft (q's argmax at each position) and its
        distribution draft (sampled from q, q to the verifier), from one batched pass."""
        n = len(keys)
        one_hot, dist = self._propose(keys, max_lengths, [[False] * n, [True] * n])
        return list(zip(one_hot, dist))

    @torch.inference_mode()
    def _propose(self, keys, max_lengths, kinds: list[list[bool]]) -> list[list[Draft]]:
        """A draft per request for each of ``kinds`` (per request: a distribution draft?),
        every kind's rows in one `draft_tensors` call and one copy to the host."""
        out = [[EMPTY_DRAFT] * len(keys) for _ in kinds]
        if not self.ready:
            return out
        rows = [i for i, (k, n) in enumerate(zip(keys, max_lengths)) if n > 0 and k in self._last]
        if not rows:
            return out
        lens = [max_lengths[i] for i in rows]
        live = [keys[i] for i in rows]
        hidden, tokens = self._last_rows(live), [self._last[k][2] for k in live]
        if len(kinds) > 1:
            hidden, tokens = hidden.repeat(len(kinds), 1), tokens * len(kinds)
        flags = [bool(kind[i]) for kind in kinds for i in rows]
        _, _, qs, packed, vocab = self.draft_tensors(hidden, tokens, max(lens), flags)
        # The one wait for the device: a single copy of tokens and confidences (ids are
        # exact in float64), because the Draft contract is Python lists.
        host = packed.cpu()
        toks, confs = host[0].long().tolist(), host[1].tolist()
        for c, drafts in enumerate(out):
            for j, i in enumerate(rows):
                r, n = c * len(rows) + j, lens[j]
                drafts[i] = Draft(toks[r][:n], confs[r][:n],
                                  q_ids=vocab.expand(n, -1) if flags[r] else None,
                                  q=qs[r, :n] if flags[r] else None)
        return out

    def draft_rows(self, keys, steps: int, sample: Sequence[bool]):
        """`draft_tensors` for requests ``keys`` from their captured last hidden state and
        token, or None where one of them has none (or no draft vocabulary is chosen)."""
        if not self.ready or any(k not in self._last for k in keys):
            return None
        return self.draft_tensors(self._last_rows(keys), [self._last[k][2] for k in keys],
                                  steps, sample)

    @torch.inference_mode()
    def draft_tensors(self, hidden, tokens, steps: int, sample: Sequence[bool]):
        """Draft ``steps`` tokens for each row, on the device, without waiting for it:
        ``hidden`` the last hidden state of each request (a list of [d] rows or a [n, d]
        tensor, any device), ``tokens`` the token sampled from it (ints or a tensor),
        ``sample``: per row, draw from q (else its argmax). Returns (token ids [n, steps]
        int64, their q probability [n, steps] float32, q [n, steps, |draft vocab|]
        float32, and ids and probabilities together [2, n, steps] float64 (ids are exact:
        one copy takes both to the host)), on the drafter's device. On CUDA the drafting
        loop replays as a CUDA graph per batch bucket (`kernels.graphs`; off with
        ``ATLAS_RL_CUDA_GRAPHS=0``)."""
        self._sub_head()
        head_t = self._head_sub_t
        device, dtype = head_t.device, head_t.dtype
        weights, eps = self.net.inference_weights(dtype), self.net.eps
        n = len(sample)
        h = hidden if isinstance(hidden, torch.Tensor) else torch.stack(list(hidden))
        # Per-request bookkeeping stays in Python lists; what the device needs goes over
        # in non-blocking copies, so nothing here waits for it.
        h = to_device(h, None, device)
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(list(tokens), dtype=torch.long)
        sampling = any(sample)
        generator = self._sampling_generator(device) if sampling else None
        graphs = self.graphs if self.graphs is not None else device.type == "cuda"
        if graphs and cuda_graphs_enabled():
            return DraftTensors(*self._draft_graphed(weights, eps, h, tokens, steps, sample,
                                                     generator), self._vocab_dev)
        u = torch.rand(n, steps, generator=generator, device=device) if sampling else None
        do_sample = staged_on(tuple(bool(x) for x in sample), torch.bool, device) if sampling \
            else None
        return DraftTensors(*self._draft_loop(weights, eps, steps, h.to(dtype),
                                              to_device(tokens, None, device), do_sample, u),
                            self._vocab_dev)

    def _draft_loop(self, weights, eps: float, steps: int, h, tok, do_sample, u):
        """The drafting loop on device tensors only (a CUDA graph can hold it)."""
        vocab, dtype = self._vocab_dev, h.dtype
        toks, confs, qs = [], [], []
        for j in range(steps):
            y = DrafterNet.draft_step(weights, h, self._embed.index_select(0, tok).to(dtype), eps)
            q = torch.softmax(self.head_logits(y).float(), dim=-1)
            idx = q.argmax(-1)
            if u is not None:
                idx = torch.where(do_sample, inverse_cdf(q, u[:, j], torch.float32), idx)
            toks.append(idx)
            confs.append(q.gather(1, idx[:, None]).squeeze(1))
            qs.append(q)
            h, tok = y, vocab[idx]
        ids, confs = vocab[torch.stack(toks, 1)], torch.stack(confs, 1)
        return ids, confs, torch.stack(qs, 1), torch.stack((ids.double(), confs.double()))

    def _draft_graphed(self, weights, eps, h, tok, steps, sample, generator):
        """`_draft_loop` replayed from a CUDA graph of this batch's bucket. A graph holds the
        weights' addresses: new weights (an update, a new draft vocabulary, a new policy
        embedding) drop the cached graphs first."""
        n, dtype = len(sample), self._head_sub_t.dtype
        tag = (id(weights), id(self._head_linear), id(self._vocab_dev), self._embed.data_ptr())
        if self._graph_tag != tag:
            self._graphs.clear()
            self._graph_tag = tag
        padded, sampling = bucket(n), generator is not None
        device = h.device

        def make_inputs():
            return {"h": torch.zeros(padded, h.shape[-1], dtype=dtype, device=device),
                    "tok": torch.zeros(padded, dtype=torch.long, device=device),
                    "do_sample": torch.zeros(padded, dtype=torch.bool, device=device),
                    "u": torch.zeros(padded, steps, device=device)}

        def loop(h, tok, do_sample, u):
            return self._draft_loop(weights, eps, steps, h, tok, do_sample,
                                    u if sampling else None)

        graph = self._graphs.get((padded, steps, sampling, dtype), make_inputs, loop,
                                 name=f"draft[{padded}x{steps}]")
        bufs = graph.inputs
        # tokens from the host: pinned, straight into the graph's buffer, not waited for
        pinned = device.type == "cuda" and tok.device.type == "cpu"
        bufs["tok"][:n].copy_(tok.pin_memory() if pinned else tok, non_blocking=True)
        dst, src = [bufs["h"][:n]], [h]
        if sampling:
            dst.append(bufs["do_sample"][:n])
            src.append(staged_on(tuple(bool(x) for x in sample), torch.bool, device))
            torch.rand(n, steps, generator=generator, device=device, out=bufs["u"][:n])
        torch._foreach_copy_(dst, src)
        ids, confs, qs, packed = graph()
        if n == padded:
            return ids, confs, qs, packed
        return ids[:n], confs[:n], qs[:n], packed[:, :n]

    # --- learning ---------------------------------------------------------------------

    def _sampling_generator(self, device: torch.device) -> torch.Generator:
        """The generator of draft sampling: the CPU one on the CPU (as before devices), one
        seeded the same way on an accelerator (a CPU generator cannot feed CUDA draws)."""
        if device.type == "cpu":
            return self._generator
        gen = self._device_generator
        if gen is None or gen.device != device:
            gen = self._device_generator = torch.Generator(device).manual_seed(self.seed)
        return gen

    def take_captured(self, sampled: list | None = None) -> Rows | None:
        """The training rows (h_t, x_{t+1}, h_{t+1}) captured since the last call, or
        None; the capture is emptied. ``sampled``: a list that receives every sampled
        token (the last of a stream too, which makes no training row), for the draft
        vocabulary's counts (`collect`)."""
        streams = self._done + list(self._streams.values())
        self._done, self._streams = [], {}
        xs, ts, ys = [], [], []
        if sampled is not None:
            sampled.extend(torch.tensor(s.tokens) for s in streams if s.tokens)
        for stream in streams:
            if len(stream.tokens) < 2:
                continue
            h = torch.cat(stream.hidden)
            xs.append(h[:-1])
            ts.append(torch.tensor(stream.tokens[:-1]))
            ys.append(h[1:])
        return (torch.cat(xs), torch.cat(ts), torch.cat(ys)) if xs else None

    def collect(self) -> int:
        """Move the hidden states captured since the last call into the training buffer
        (their sampled tokens into the draft vocabulary's counts, `observe_tokens`);
        returns the number of new training rows."""
        tokens, self._foreign_tokens = self._foreign_tokens, []
        got = self.take_captured(sampled=tokens)
        if got is not None:
            self.distiller.buffer.add(*got)
        if tokens:
            self._vocab_stats = self.observe_tokens(torch.cat(tokens))
        return len(got[1]) if got is not None else 0

    def add_captured(self, rows: Rows) -> None:
        """Rows captured elsewhere (another rank's `take_captured`) into the buffer;
        their tokens are counted at the next `collect`."""
        self.distiller.buffer.add(*rows)
        self._foreign_tokens.append(rows[1])

    def published(self) -> dict:
        """The published drafter (weights, draft vocabulary and counters), e.g. to
        broadcast to other ranks."""
        return {**self.distiller.published(self.net),
                "vocab": None if self.vocab is None else self.vocab.clone(),
                "vocab_source": self.vocab_source,
                "token_counts": None if self.token_counts is None else self.token_counts.clone()}

    def load_published(self, state: dict) -> None:
        self.distiller.load_published(self.net, state)
        if state.get("vocab") is not None and not torch.equal(
                state["vocab"], self.vocab if self.vocab is not None else state["vocab"][:0]):
            self.vocab, self._head_stale = state["vocab"].clone(), True
        self.vocab_source = state.get("vocab_source", self.vocab_source)
        if state.get("token_counts") is not None:  # every rank saves the same state
            self.token_counts = state["token_counts"].clone()

    def learn(self, sequences=(), time_budget: float | None = None,
              stop: Stop | None = None) -> dict[str, float]:
        """Train on the hidden states captured since the last call (the batch's rollouts;
        `sequences` themselves are not needed), for at most `time_budget` seconds, ending
        early once `stop` is set."""
        if self.frozen or self._embed is None or self.net is None:
            self._done, self._streams = [], {}
            return {}
        start = time.perf_counter()
        self._vocab_stats = {}
        self.collect()
        if not self.distiller.buffer or self.vocab is None:
            return dict(self._vocab_stats)
        if time_budget is not None:  # collecting the capture came out of the budget
            time_budget = max(0.0, time_budget - (time.perf_counter() - start))
        stats = self.train(time_budget=time_budget, max_epochs=self.distiller.max_epochs,
                           stop=stop)
        return {**stats, **self._vocab_stats}

    def train(self, time_budget: float | None = None, max_epochs: int = 1,
              progress=None, stop: Stop | None = None) -> dict[str, float]:
        """Distil on the buffer (`Distiller.train`) and publish into this drafter."""
        return self.distiller.train(self.net, self._embed, self._sub_head(), self._generator,
                                    time_budget=time_budget, max_epochs=max_epochs,
                                    progress=progress, stop=stop)

    def evaluate(self, h: torch.Tensor, tok: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """First-position acceptance on held-out rows (`distill.acceptance`)."""
        self._sub_head()
        return acceptance(self.net, self._embed, self._head, self._vocab_dev, h, tok, target)

    # --- state ------------------------------------------------------------------------

    def state(self):
        if self.net is None:
            return {}, {"empty": True}
        tensors = {f"net.{k}": v.detach().cpu().clone()
                   for k, v in self.net.state_dict().items()}
        if self.vocab is not None:
            tensors["vocab"] = self.vocab.clone()
        if self.token_counts is not None and bool(self.token_counts.any()):
            tensors["token_counts"] = self.token_counts.clone()
        d = self.distiller
        meta = {"hidden_size": self.net.hidden_size, "draft_vocab_size": self.draft_vocab_size,
                "vocab_source": self.vocab_source,
                "lr": d.lr, "version": d.version, "rollbacks": d.rollbacks, "loss_ema": d.loss_ema,
                "loss_ema_kind": d.loss_ema_kind}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        if meta.get("empty"):
            return
        net = DrafterNet(int(meta["hidden_size"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net = net
        self.vocab = tensors["vocab"].long() if "vocab" in tensors else None
        self.vocab_source = meta.get("vocab_source", "static")
        if "token_counts" in tensors:
            self.token_counts = tensors["token_counts"].float().clone()
        self.draft_vocab_size = int(meta.get("draft_vocab_size", len(self.vocab)
                                             if self.vocab is not None else self.draft_vocab_size))
        d = self.distiller
        d.version = int(meta.get("version", 0))
        d.rollbacks = int(meta.get("rollbacks", 0))
        d.loss_ema = meta.get("loss_ema")
        d.loss_ema_kind = meta.get("loss_ema_kind", "ce")  # saved before the TV loss: ce
        d.optimizer_state = None
        self._head_stale = True
        if self._embed is not None:
            self.attach_target(self._embed, self._head)
