"""The neural drafter's network: one residual MLP block over the policy's hidden state.

    z = h_t + W_out silu(W_in [h_t ; E x_{t+1}])        y = rmsnorm(z) * g

h_t is the policy's final (normed) hidden state at the position that produced token
x_{t+1}, E the policy's token embedding; y stands for the next hidden state, and the
policy's LM head turns it into the draft distribution q (`NeuralSpeculator`). The
network owns only W_in, W_out and g (~1M parameters for a 576-wide model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
