"""The neural drafter's network: one residual MLP block over the policy's hidden state.

    z = h_t + W_out silu(W_in [h_t ; E x_{t+1}])        y = rmsnorm(z) * g

h_t is the policy's final (normed) hidden state at the position that produced token
x_{t+1}, E the policy's token embedding; y stands for the next hidden state, and the
policy's LM head turns it into the draft distribution q (`NeuralSpeculator`). The
network owns only W_in, W_out and g (~1M parameters for a 576-wide model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atlas_rl.kernels.gemm import PackedLinear


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

    def inference_weights(self, dtype: torch.dtype = torch.float32) -> tuple:
        """The weights laid out for drafting, in ``dtype``: each matrix a
        `kernels.gemm.PackedLinear` (packed once for the CPU's GEMM library where vLLM's
        CPU extension offers it; float32 against a transposed copy), and the norm's
        gain. Cached until a parameter is modified (tensor version counters: optimizer
        steps, load_state_dict, publish) or another dtype is asked for."""
        params = (self.w_in.weight, self.w_in.bias, self.w_out.weight, self.w_out.bias,
                  self.norm)
        key = (dtype, *((id(t), t._version) for t in params))
        cached = getattr(self, "_inference_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                def packed(layer):
                    return PackedLinear(layer.weight.detach().to(dtype).contiguous(),
                                        layer.bias.detach().to(dtype).clone())

                weights = (packed(self.w_in), packed(self.w_out),
                           self.norm.detach().to(dtype).clone())
            cached = self._inference_cache = (key, weights)
        return cached[1]

    @staticmethod
    def draft_step(weights, h: torch.Tensor, e: torch.Tensor, eps: float) -> torch.Tensor:
        """`forward` with `inference_weights` (no autograd; the same function)."""
        w_in, w_out, g = weights
        z = h + w_out(F.silu(w_in(torch.cat([h, e], dim=-1))))
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
        return z * g


# --- the EAGLE-3-class drafter ----------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, returned in x's dtype (drafting in bfloat16 stays bfloat16)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (the half-split form Llama uses): x [..., n, heads, hd],
    pos [..., n] (any integer positions; only differences matter to attention)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = pos.to(torch.float32)[..., None] * inv                      # [..., n, hd/2]
    cos, sin = torch.cos(ang)[..., None, :], torch.sin(ang)[..., None, :]
    cos, sin = torch.cat([cos, cos], -1).to(x.dtype), torch.cat([sin, sin], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Eagle3Net(nn.Module):
    """An EAGLE-3-class drafter: one Llama decoder layer over fused multi-layer features.

        g_t = W_fc [a_low ; a_mid ; a_high]_t           (the policy's residual stream at
                                                         three layers, position t)
        step 1:  in = (g_t, E x_{t+1})     step j > 1:  in = (m^{j-1}_t, E x_{t+j})
        a   = [rmsnorm(E x) ; rmsnorm(hidden)]           (2d wide: q, k, v read both)
        r   = hidden + W_o attn(q(a), K, V)              (K, V: this drafter's own keys and
                                                          values over the last `window`
                                                          verified positions of the
                                                          request, plus its own earlier
                                                          draft steps at this position)
        m   = r + mlp(rmsnorm(r))                        (fed back as the next step's hidden)
        y   = rmsnorm(m) * g                             (stands for the policy's final
                                                          normed hidden state: the policy's
                                                          LM head turns it into q)

    Keys and values of verified positions are computed once, when their features arrive
    (`kv`), so a rejected draft leaves nothing to roll back: draft steps' keys live only
    inside one `propose`. Positions are rotary, as in the policy. ~5M parameters for a
    576-wide model (SmolLM2-135M), ~2-3% of its forward per draft position plus the head.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, num_aux: int = 3, eps: float = 1e-5,
                 rope_theta: float = 10000.0, window: int = 32):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                             f"{num_kv_heads}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        d = self.hidden_size = int(hidden_size)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.intermediate_size, self.num_aux = intermediate_size, num_aux
        self.eps, self.rope_theta, self.window = float(eps), float(rope_theta), int(window)
        self.fc = nn.Linear(num_aux * d, d, bias=False)
        self.embed_norm = nn.Parameter(torch.ones(d))
        self.hidden_norm = nn.Parameter(torch.ones(d))
        self.q_proj = nn.Linear(2 * d, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * d, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * d, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d, bias=False)
        self.post_norm = nn.Parameter(torch.ones(d))
        self.gate_proj = nn.Linear(d, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d, bias=False)
        self.final_norm = nn.Parameter(torch.ones(d))
        for lin in (self.fc, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                    self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=0.02)
        with torch.no_grad():  # fc starts as "the highest layer's features"
            self.fc.weight.zero_()
            self.fc.weight[:, (num_aux - 1) * d:].copy_(torch.eye(d))

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size, "num_aux": self.num_aux,
                "eps": self.eps, "rope_theta": self.rope_theta, "window": self.window}

    @classmethod
    def for_policy(cls, cfg, window: int = 32, num_aux: int = 3) -> "Eagle3Net":
        """Sized like one layer of the policy whose (transformers-style) config is `cfg`."""
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        return cls(int(cfg.hidden_size), heads, int(cfg.num_key_value_heads or heads),
                   head_dim, int(cfg.intermediate_size), num_aux=num_aux,
                   eps=float(cfg.rms_norm_eps), rope_theta=theta, window=window)

    @torch.no_grad()
    def init_from_policy_layer(self, state: dict, layer: int, prefix: str = "model.") -> None:
        """Start from the policy's own decoder layer `layer` (a Llama state dict, e.g. the
        top layer): attention reads the hidden half of its input with the layer's weights
        (the embedding half starts at zero), MLP and norms copied, the final norm the
        policy's. Begins near "the policy's next layer", not at random."""
        p = f"{prefix}layers.{layer}."
        d = self.hidden_size
        for name in ("q_proj", "k_proj", "v_proj"):
            w = state[f"{p}self_attn.{name}.weight"].float()
            lin = getattr(self, name)
            lin.weight.zero_()
            lin.weight[:, d:].copy_(w)
        self.o_proj.weight.copy_(state[f"{p}self_attn.o_proj.weight"].float())
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).weight.copy_(state[f"{p}mlp.{name}.weight"].float())
        self.hidden_norm.copy_(state[f"{p}input_layernorm.weight"].float())
        self.embed_norm.copy_(state[f"{p}input_layernorm.weight"].float())
        self.post_norm.copy_(state[f"{p}post_attention_layernorm.weight"].float())
        self.final_norm.copy_(state[f"{prefix}norm.weight"].float())

    # -- pieces ------------------------------------------------------------------------

    def _lin(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """lin(x); without autograd (drafting, evaluation) against a cached contiguous
        [in, out] copy of the weight (DrafterNet.inference_weights: ~8x faster for a few
        rows on 2 CPU cores), refreshed when the weight changes (version counter)."""
        if torch.is_grad_enabled():
            return lin(x)
        cache = self.__dict__.setdefault("_weights_t", {})
        w = lin.weight
        key = (id(w), w._version, w.device, x.dtype)
        hit = cache.get(id(lin))
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = cache[id(lin)] = (key, w.detach().t().to(x.dtype).contiguous())
        return x @ hit[1]

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., num_aux * d] -> [..., d]."""
        return self._lin(aux, self.fc)

    def _attn_input(self, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return torch.cat([_rms(e, self.embed_norm, self.eps),
                          _rms(hidden, self.hidden_norm, self.eps)], dim=-1)

    def kv(self, hidden: torch.Tensor, e: torch.Tensor, pos: torch.Tensor):
        """Keys (rotated) and values of inputs (hidden, E x) at `pos`: [..., kv_heads, hd]."""
        a = self._attn_input(hidden, e)
        k = self._lin(a, self.k_proj).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self._lin(a, self.v_proj).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return _rope(k, pos, self.rope_theta), v

    def query(self, hidden, e, pos):
        q = self._lin(self._attn_input(hidden, e), self.q_proj).unflatten(
            -1, (self.num_heads, self.head_dim))
        return _rope(q, pos, self.rope_theta)

    def finish(self, hidden: torch.Tensor, attn: torch.Tensor):
        """attn [..., heads, hd] -> (m: the residual stream fed back, y: the normed output)."""
        r = hidden + self._lin(attn.flatten(-2), self.o_proj)
        x = _rms(r, self.post_norm, self.eps)
        m = r + self._lin(F.silu(self._lin(x, self.gate_proj)) * self._lin(x, self.up_proj),
                          self.down_proj)
        return m, _rms(m, self.final_norm, self.eps)

    def attend(self, q, keys, values, mask):
        """q [B, H, hd]; keys/values [B, S, KV, hd]; mask [B, S] (True = attend). Grouped:
        head h reads key/value head h // (H / KV), without repeating keys."""
        B, H, hd = q.shape
        kv = self.num_kv_heads
        qg = q.view(B, kv, H // kv, hd)
        scores = torch.einsum("bgrd,bsgd->bgrs", qg, keys) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        w = torch.softmax(scores.float(), -1).to(q.dtype)
        return torch.einsum("bgrs,bsgd->bgrd", w, values).reshape(B, H, hd)

    # -- training: all positions of a batch of sequences, unrolled ----------------------

    def unroll(self, aux: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor,
               valid: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test: draft `steps` positions ahead from every position at once,
        each step fed the previous step's own output, as drafting does.

        aux [B, T, num_aux*d]: features at positions pos[b, t]; emb [B, T + steps - 1, d]:
        embeddings of the tokens x_{t+1}, x_{t+2}, ... (the token sampled at t first);
        valid [B, T]: real positions. Step j at t attends the verified positions
        (t - window, t] (their step-1 keys) and its own steps 2..j at t.
        Returns y of each step, [B, T, d] (step j predicts the token after x_{t+j})."""
        B, T, _ = aux.shape
        g = self.fuse(aux)
        idx = torch.arange(T, device=aux.device)
        band = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - self.window)
        # (a padded query attends itself only, so no row is empty; its loss is masked)
        mask = (band[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool,
                                                             device=aux.device)[None]
        k1, v1 = self.kv(g, emb[:, :T], pos)                        # [B, T, KV, hd]
        rep = self.num_heads // self.num_kv_heads
        K1 = k1.repeat_interleave(rep, dim=2)
        V1 = v1.repeat_interleave(rep, dim=2)
        hidden, extra_k, extra_v, ys = g, [], [], []
        scale = 1.0 / math.sqrt(self.head_dim)
        for j in range(steps):
            e = emb[:, j:j + T]
            p = pos + j
            q = self.query(hidden, e, p)                             # [B, T, H, hd]
            if j:
                k, v = self.kv(hidden, e, p)
                extra_k.append(k.repeat_interleave(rep, dim=2))
                extra_v.append(v.repeat_interleave(rep, dim=2))
            s = torch.einsum("bthd,bshd->bhts", q, K1) * scale
            s = s.masked_fill(~mask[:, None], float("-inf"))
            if extra_k:
                sx = torch.stack([(q * k).sum(-1) for k in extra_k], -1) * scale  # [B,T,H,j]
                s = torch.cat([s, sx.permute(0, 2, 1, 3)], -1)
            w = torch.softmax(s.float(), -1).to(q.dtype)
            out = torch.einsum("bhts,bshd->bthd", w[..., :T], V1)
            for r, v in enumerate(extra_v):
                out = out + w[..., T + r].permute(0, 2, 1)[..., None] * v
            hidden, y = self.finish(hidden, out)
            ys.append(y)
        return ys
