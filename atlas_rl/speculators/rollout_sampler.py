"""Temperature-1 rollouts for offline distillation at GPU scale, without vLLM.

`transformers`' ``generate`` is slow at the batch sizes a distillation wants (thousands of
sequences): its dynamic cache concatenates every layer's keys and values at each step and
its attention repeats them per query-head group, so a step moves the whole cache several
times. `StaticCacheSampler` runs the policy's own modules (projections, norms, MLP,
rotary embedding, head) with a key/value cache allocated once per batch, attends each new
token over the filled part of it (one read, grouped-query heads served from the shared
keys and values), and samples by an exponential race, which draws exactly from
softmax(logits). It serves the decoder-only Llama family (`SUPPORTED`: Llama, Mistral
without a sliding window, Qwen2), the shape of most open policies; anything else is
answered with the reason by `unsupported_reason`, and the distillation falls back to
``generate``.

The logits it samples from are the policy's: `tests/test_rollout_sampler.py` compares
them, step by step, with a full transformers forward over the finished sequences.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def unsupported_reason(model) -> str | None:
    """None where `StaticCacheSampler` can run `model`, else why not."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one of {SUPPORTED}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"a sliding attention window ({cfg.sliding_window}) is not supported"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} has no .model.layers / .model.rotary_emb"
    if model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no output embeddings"
    return None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, the rotate-half convention of the Llama family; cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


class StaticCacheSampler:
    """Batched temperature-1 sampling from a Llama-family transformers model."""

    def __init__(self, model, prefill_rows: int = 256):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"StaticCacheSampler: {reason}")
        self.model = model
        cfg = model.config
        self.inner = model.model
        self.head = model.get_output_embeddings()
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.group = self.n_heads // self.n_kv
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefill_rows = prefill_rows

    def _layer(self, layer, h, cos, sin, k_cache, v_cache, at: int, mask: torch.Tensor,
               prefill: bool) -> torch.Tensor:
        """One decoder layer; `mask` (`_forward`): prefill, the positions each query may
        attend [B, 1, T, T]; decoding, the cache positions it may not [B, 1, 1, L]."""
        attn = layer.self_attn
        B, T, _ = h.shape
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_cache[:, :, at:at + T] = k
        v_cache[:, :, at:at + T] = v
        L = at + T
        if prefill:
            out = F.scaled_dot_product_attention(
                q, k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1),
                attn_mask=mask, scale=attn.scaling)
            out = out.transpose(1, 2).reshape(B, T, -1)
        else:  # one new token: grouped query heads read each shared key/value once
            qg = q.view(B, self.n_kv, self.group, self.head_dim)
            scores = torch.matmul(qg, k_cache[:, :, :L].transpose(-1, -2)).float() * attn.scaling
            scores.masked_fill_(mask, float("-inf"))
            probs = scores.softmax(-1).to(v_cache.dtype)
            out = torch.matmul(probs, v_cache[:, :, :L]).reshape(B, 1, -1)
        h = h + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _forward(self, ids, pos, caches, at: int, keep, prefill: bool) -> torch.Tensor:
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, pos)
        T, L = ids.shape[1], at + ids.shape[1]
        if prefill:  # causal over the (left-padded) prompt; a pad row sees itself only
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=h.device)
            mask = (causal & keep[:, None, None, :L]) | eye
        else:  # one new token: the cache's padding is what it may not attend
            mask = ~keep[:, None, None, :L]
        for layer, (kc, vc) in zip(self.inner.layers, caches):
            h = self._layer(layer, h, cos, sin, kc, vc, at, mask, prefill)
        return self.head(self.inner.norm(h[:, -1:])).squeeze(1).float()

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], max_tokens: int, eos: int | list[int], pad: int,
               generator: torch.Generator | None = None,
               return_logits: bool = False) -> list[list[int]] | tuple[list[list[int]], list]:
        """One temperature-1 completion per prompt (ids up to and including EOS, at most
        `max_tokens`). `return_logits` also returns each step's float32 logits (tests)."""
        B = len(prompts)
        W = max(len(p) for p in prompts)
        dev = self.device
        ids = torch.full((B, W), pad, dtype=torch.long)
        keep_cpu = torch.zeros((B, W + max_tokens), dtype=torch.bool)
        for i, p in enumerate(prompts):  # left padding
            ids[i, W - len(p):] = torch.tensor(p, dtype=torch.long)
            keep_cpu[i, W - len(p):] = True
        keep_cpu[:, W:] = True
        ids, keep = ids.to(dev), keep_cpu.to(dev)
        pos = (keep[:, :W].long().cumsum(-1) - 1).clamp(min=0)
        caches = [(torch.empty((B, self.n_kv, W + max_tokens, self.head_dim), dtype=self.dtype, device=dev),
                   torch.empty((B, self.n_kv, W + max_tokens, self.head_dim), dtype=self.dtype, device=dev))
                  for _ in self.inner.layers]
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=dev)
        rows = max(1, self.prefill_rows)
        logits = torch.cat([  # the prompts in slices of rows: bounded activation memory
            self._forward(ids[s:s + rows], pos[s:s + rows],
                          [(kc[s:s + rows], vc[s:s + rows]) for kc, vc in caches], 0,
                          keep[s:s + rows], prefill=True)
            for s in range(0, B, rows)])
        next_pos = pos[:, -1:] + 1
        out = torch.full((B, max_tokens), pad, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        seen = []
        for t in range(max_tokens):
            if return_logits:
                seen.append(logits.cpu())
            # exponential race: argmax(p / E), E ~ Exp(1), is a draw from p exactly
            # (clamped away from 0, whose log would make any token win)
            race = torch.empty_like(logits).exponential_(generator=generator)
            race = race.clamp_(min=torch.finfo(race.dtype).tiny).log_()
            tok = torch.argmax(logits - race, dim=-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out[:, t] = tok
            done |= torch.isin(tok, eos_ids)
            if t + 1 == max_tokens or (t % 16 == 15 and bool(done.all())):
                break
            logits = self._forward(tok[:, None], next_pos, caches, W + t, keep, prefill=False)
            next_pos = next_pos + 1
        out_cpu, eos_set = out.cpu().tolist(), set(eos_ids.tolist())
        comps = []
        for row in out_cpu:
            for j, tk in enumerate(row):
                if tk in eos_set:
                    row = row[:j + 1]
                    break
            comps.append(row[:t + 1])
        return (comps, seen) if return_logits else comps


def sample_rollouts(model, prompt_ids: list[list[int]], completions: int, max_tokens: int,
                    eos: int, pad: int, batch_prompts: int, seed: int,
                    say=lambda *a: None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) for `completions` samples of each prompt, in batches of
    `batch_prompts` prompts; empty completions are dropped."""
    sampler = StaticCacheSampler(model)
    gen = torch.Generator(device=sampler.device).manual_seed(seed)
    out, start, n_tok = [], time.perf_counter(), 0
    for b in range(0, len(prompt_ids), batch_prompts):
        chunk = prompt_ids[b:b + batch_prompts]
        flat = [p for p in chunk for _ in range(completions)]
        for p, c in zip(flat, sampler.sample(flat, max_tokens, eos, pad, gen)):
            if c:
                out.append((p, c))
                n_tok += len(c)
        say(f"generate (static cache): {min(b + batch_prompts, len(prompt_ids))}/{len(prompt_ids)} "
            f"prompts, {n_tok} tokens, {time.perf_counter() - start:.0f} s")
    return out
