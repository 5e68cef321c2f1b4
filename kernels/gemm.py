"""Small-batch matmuls against weights that change rarely: the drafters' layers and head.

A draft position multiplies a handful of rows (one per request) by each of the drafter's
matrices. On the CPU that product is bound by how the weight is laid out, not by
arithmetic: torch's bf16 ``F.linear`` hands oneDNN a plain [out, in] matrix and lets it
reorder the weight on every call (576 x 576: ~60 us warm on 2 cores, ~30 us prepacked;
the 4,096 x 576 head ~345 vs ~205 us). `PackedLinear` packs the weight once, where vLLM's
CPU extension offers its oneDNN matmul handler (``torch.ops._C.create_onednn_mm_handler``,
loaded with vLLM's CPU build: the GEMM vLLM's own linear layers use there), and falls
back to torch elsewhere: float32 against a transposed contiguous copy (``addmm``: ~4x
faster than ``F.linear`` against the [out, in] layout at 4 rows on 2 cores), other
dtypes and devices ``F.linear``. Same products to rounding in every path (oneDNN's bf16
kernels accumulate in float32, as torch's do).

Build one per weight version: a packed copy ("onednn", "addmm") does not follow later
in-place updates of the weight it was built from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onednn_available() -> bool:
    """vLLM's CPU extension is loaded and has its oneDNN matmul handler."""
    try:
        ops = torch.ops._C
        return hasattr(ops, "create_onednn_mm_handler") and hasattr(ops, "onednn_mm")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """``y = x @ weight.T + bias`` for x [..., in] with ``weight`` [out, in] packed once
    for the device's GEMM library (module docstring). ``kind`` says which path runs:
    "onednn", "addmm" or "linear"."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 use_onednn: bool | None = None):
        if weight.ndim != 2:
            raise ValueError(f"PackedLinear: weight must be [out, in], got {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self._source = (weight, bias, use_onednn)  # what a copy packs again
        self.bias = bias
        self.weight = weight
        self._handler = None
        cpu = weight.device.type == "cpu"
        if use_onednn is None:
            use_onednn = weight.dtype in (torch.bfloat16, torch.float16)
        if cpu and use_onednn and onednn_available():
            try:
                self._handler = torch.tensor(
                    torch.ops._C.create_onednn_mm_handler(weight.t(), 32), dtype=torch.int64)
                self.kind = "onednn"
            except RuntimeError:  # e.g. a dtype this oneDNN build cannot pack
                self._handler = None
        if self._handler is None:
            if cpu and weight.dtype == torch.float32:
                self.weight = weight.t().contiguous()  # [in, out]
                self.kind = "addmm"
            else:
                self.kind = "linear"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "onednn":
            rows = x.reshape(-1, self.in_features)
            if not rows.is_contiguous():
                rows = rows.contiguous()
            out = torch.empty((*x.shape[:-1], self.out_features), dtype=x.dtype)
            torch.ops._C.onednn_mm(out, rows, self.bias, self._handler)
            return out
        if self.kind == "addmm":
            rows = x.reshape(-1, self.in_features)
            y = rows @ self.weight if self.bias is None else torch.addmm(self.bias, rows,
                                                                        self.weight)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def __deepcopy__(self, memo) -> PackedLinear:
        """A copy packs its own weight: two objects must never share (and both release)
        one oneDNN handler (`copy.deepcopy` of a drafter network holding its inference
        cache: the distiller's working copy)."""
        import copy

        weight, bias, use_onednn = self._source
        return PackedLinear(copy.deepcopy(weight, memo), copy.deepcopy(bias, memo), use_onednn)

    def __copy__(self) -> PackedLinear:
        weight, bias, use_onednn = self._source
        return PackedLinear(weight, bias, use_onednn)

    def __reduce__(self):
        weight, bias, use_onednn = self._source
        return PackedLinear, (weight, bias, use_onednn)

    def __del__(self):
        handler = getattr(self, "_handler", None)
        if handler is not None:
            try:
                torch.ops._C.release_dnnl_matmul_handler(int(handler.item()))
            except Exception:  # noqa: BLE001 (interpreter shutdown: the op may be gone)
                pass
