"""The Triton verification path (kernels/rejection_triton.py) on a machine without a GPU:

- run by Triton's interpreter, it returns the torch reference's tokens on the same
  uniforms (one-hot, sparse and dense q; ragged drafts, requests without drafts, padding,
  -inf logits, bf16 logits; residual searches over one chunk and over several), and
  logprobs within the float32 tolerance of `atlas_rl.kernels.testing.logprob_tolerance`;
- every kernel variant compiles for an H100 (sm_90) with Triton's own ptxas, which the
  interpreter cannot show (it accepts code the compiler rejects).

The interpreter is chosen when Triton decorates the kernels, at import: the comparison
runs in a child process with TRITON_INTERPRET=1. On a GPU, tests/test_gpu.py runs the
compiled kernels against the same reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "probes" / "triton_verification_probe.py"


def test_interpreted_kernels_return_the_reference_tokens(subprocess_env):
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(PROBE), "cpu"], check=False, capture_output=True,
                          text=True, env=subprocess_env(TRITON_INTERPRET=1), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 15
    paths = {}
    for name, r in results.items():
        assert r["equal"] and r["placeholders_match"], (name, r)
        assert r["graph_equal"], (name, r)  # the padded static buffers of the CUDA graph
        assert r["logprob_within_tolerance"], (name, r)
        kind = name.split("/")[0]
        for path in ("accepted", "recovered", "bonus"):
            paths[kind, path] = paths.get((kind, path), 0) + r[path]
    # every kind went through acceptance, the residual draw and the bonus token
    assert min(paths.values()) >= 3, paths


def _signature(fn, constexprs: dict, pointers: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        else:
            sig[name] = "i32"
    return sig


def test_every_kernel_variant_compiles_for_h100():
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted, not compiled")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this Triton has no offline compile API: {e}")
    from atlas_rl.kernels import rejection_triton as rt

    ints = {"x_ptr": "*i64", "ids_ptr": "*i64", "bonus_ptr": "*i64", "meta_ptr": "*i32",
            "first_ptr": "*i32", "out_ptr": "*i32", "uniform_ptr": "*fp64",
            "recovery_ptr": "*fp64", "sums_ptr": "*fp64", "rmass_ptr": "*fp64",
            "mass_ptr": "*fp64", "scratch_ptr": "*fp64"}
    variants = [(rt._row_stats_kernel, {"CHUNK": 4096}, {}, 8),
                (rt._row_stats_kernel, {"CHUNK": 4096}, {"logits_ptr": "*bf16"}, 8)]
    for q_kind in (0, 1, 2):
        for logprobs in (False, True):
            variants.append((rt._accept_kernel, {"Q_KIND": q_kind, "WITH_LOGPROBS": logprobs,
                                                 "CHUNKS_PAD": 64, "BLOCK_S": 256,
                                                 "WIDTH_PAD": 16}, ints, 4))
        variants.append((rt._recover_kernel, {"Q_KIND": q_kind, "WITH_LOGPROBS": True,
                                              "CHUNK": 4096, "CHUNKS_PAD": 64, "BLOCK_S": 64},
                         ints, 8))
    for phase in (0, 1):
        variants.append((rt._residual_mass_kernel, {"PHASE": phase, "CHUNK": 4096,
                                                    "CHUNKS_PAD": 64}, ints, 8))
    target = GPUTarget("cuda", 90, 32)
    for kernel, constexprs, pointers, warps in variants:
        fn = kernel.fn if hasattr(kernel, "fn") and hasattr(kernel.fn, "arg_names") else kernel
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, constexprs, pointers),
                            constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        except (TypeError, AttributeError) as e:
            pytest.skip(f"this Triton's ASTSource differs: {e}")
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        assert compiled.asm.get("cubin"), (fn.__name__, constexprs)
