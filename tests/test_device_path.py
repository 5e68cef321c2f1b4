"""The proposer's device path and the drafting graphs, on the CPU (tests/test_gpu.py runs
the same on CUDA with torch's sync debug mode):

- a step drafted on the device hands vLLM a [num_reqs, k] tensor with the tokens the host
  path hands over as lists, the same draft distributions (one-hot where a draft was the
  argmax), and the next step counts acceptance from it as the host path does;
- inside one device-path step nothing reads a tensor back except the previous step's
  pinned host copy of its drafts (two ``tolist`` of [num_reqs, k]); the host path reads
  the drafts back itself (the probe sees it: it can fail);
- the drafting loop run on a graph's padded static buffers returns the plain loop's
  tokens (q to rounding: a padded batch is another GEMM shape), across buckets, with sampled drafts, after the buffers held other batches;
  new weights drop the cached graphs;
- a drafter that fails on the device path costs that step its drafts, never the rollout.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from atlas_rl.backends.vllm.harness import ProposerHarness
from atlas_rl.kernels.rejection import unpack_sparse_q
from atlas_rl.speculators import NeuralSpeculator

VOCAB, D, BATCH, K = 300, 32, 4, 3


def drafter(seed: int = 0) -> NeuralSpeculator:
    torch.manual_seed(seed)  # the drafter's own initialisation draws from the global RNG
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(VOCAB, D, generator=g) * 0.3
    spec = NeuralSpeculator(draft_vocab_size=64, frozen=True, seed=seed)
    spec.attach_target(embed, embed)
    with torch.no_grad():
        spec.net.w_out.weight.normal_(0, D ** -0.5, generator=g)
    spec.set_vocab_from_counts(torch.rand(VOCAB, generator=g))
    spec.draft_dtype = torch.float32  # the same drafts on every CPU kind
    return spec


def harness(device_drafts: bool, sample: str, batch: int = BATCH) -> ProposerHarness:
    h = ProposerHarness(drafter(), batch, K, D, VOCAB, device_drafts=device_drafts, seed=1)
    plan_step = h.controller.plan_step

    def plan(num_seqs):  # the draft kind per request, fixed for the comparison
        p = plan_step(num_seqs)
        for name in p.sample:
            p.sample[name] = [sample == "sample" or (sample == "mixed" and i % 2 == 0)
                              for i in range(num_seqs)]
        return p

    h.controller.plan_step = plan
    return h


def dense(packed):
    """The [reqs, k, vocab] distributions a packed sparse q stands for."""
    if packed is None:
        return None
    ids, q = unpack_sparse_q(packed)
    return torch.zeros(*ids.shape[:2], VOCAB).scatter_add_(2, ids.long(), q)


@pytest.mark.parametrize("sample", ["argmax", "sample", "mixed"])
def test_device_path_hands_over_what_the_host_path_does(sample):
    host, dev = harness(False, sample), harness(True, sample)
    for step in range(6):
        host.step()
        dev.step()
        assert isinstance(host.handed, list)
        assert isinstance(dev.handed, torch.Tensor) and dev.handed.dtype == torch.int64
        assert tuple(dev.handed.shape) == (BATCH, K)
        assert dev.drafts == host.drafts, step
        q_host, q_dev = dense(host.packed_q), dense(dev.packed_q)
        if sample == "argmax":
            assert q_host is None and q_dev is None
        else:  # the same distribution per draft position (argmax rows: one-hot on x)
            assert torch.equal(q_host, q_dev), step
            if sample == "mixed":
                tok = torch.tensor(dev.drafts[1])
                assert torch.equal(q_dev[1, torch.arange(K), tok], torch.ones(K))
    a, b = host.proposer.counters, dev.proposer.counters
    assert a.num_draft_tokens > 0 and a.num_accepted_tokens > 0
    assert (a.num_draft_tokens, a.num_accepted_tokens, a.request_steps, a.arm_accepted_tokens) \
        == (b.num_draft_tokens, b.num_accepted_tokens, b.request_steps, b.arm_accepted_tokens)
    assert dev.proposer.counters.speculator_errors == 0


class HostReads(TorchFunctionMode):
    """Every call that reads a tensor's values on the host."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
             "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.READS:
            self.calls.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def test_device_path_step_reads_back_only_the_last_steps_host_copy():
    from atlas_rl.backends.vllm.proposer import StepContext

    dev, host = harness(True, "sample"), harness(False, "sample")
    reads = {}
    for name, h in (("device", dev), ("host", host)):
        h.step()
        h.step()
        # one more step by hand, so that only `propose` runs under the probe (the
        # harness's own .tolist of a handed tensor is what vLLM's runner does later)
        verified = [len(d) for d in h.drafts]
        hidden = torch.randn(sum(k + 1 for k in verified), D)
        h.proposer.begin_step(StepContext(req_ids=list(h.keys), num_verified=verified,
                                          hidden=hidden, num_prompt_tokens=[8] * BATCH))
        probe = HostReads()
        with probe:
            out = h.proposer.propose([list(d[:1]) + [7] for d in h.drafts], h.num_tokens,
                                     h.token_ids)
            assert h.proposer.take_last_packed_q() is not None  # as the runner's hook does
        reads[name] = (type(out), sorted(probe.calls))
    assert reads["device"] == (torch.Tensor, [("tolist", (BATCH, K))] * 2), reads
    # the host path reads its drafts back inside the step (the probe sees reads)
    assert ("cpu", (2, BATCH, K)) in reads["host"][1], reads


def test_graphed_drafting_loop_returns_the_plain_loops_drafts():
    plain, graphed = drafter(), drafter()
    graphed.graphs = True  # on the CPU: the graph's padded static buffers, run eagerly
    plain.graphs = False
    for n, steps, flags in [(3, 2, [True, False, True]), (4, 3, [True] * 4), (1, 2, [False]),
                            (2, 2, [False, True]), (3, 2, [False, False, True])]:
        h = torch.randn(n, D)
        tok = torch.randint(0, VOCAB, (n,)).tolist()
        a = plain.draft_tensors(list(h), tok, steps, flags)
        b = graphed.draft_tensors(list(h), tok, steps, flags)
        # tokens identical; q to rounding (a padded batch is another GEMM shape, whose
        # blocking may sum in another order; the q handed over is the one drawn from)
        assert torch.equal(a[0], b[0]), (n, steps, flags)
        for x, y in zip(a[1:], b[1:]):
            assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    # (bucket, steps, sampling): (4, 2, T) twice (3 requests pad to 4, the second time on
    # buffers another batch filled), (4, 3, T), (1, 2, F), (2, 2, T)
    assert len(graphed._graphs) == 4
    with torch.no_grad():  # new weights: the graphs that read the old ones go
        graphed.net.w_in.weight.add_(0.01)
    graphed.draft_tensors([torch.randn(D)], [1], 2, [False])
    assert len(graphed._graphs) == 1


def test_failing_drafter_on_the_device_path_costs_the_step_its_drafts_only():
    h = harness(True, "argmax")
    h.step()

    def broken(*args, **kwargs):
        raise RuntimeError("device drafting failed")

    spec = h.proposer.speculators["neural"]
    spec.draft_rows = broken
    spec.propose = broken
    h.step()
    assert h.drafts == [[]] * BATCH
    assert h.proposer.counters.speculator_errors >= 1
    del spec.draft_rows, spec.propose  # the instance attributes: the class's methods again
    h.step()
    assert isinstance(h.handed, torch.Tensor)


def test_graph_cache_keeps_its_bounds_and_reuses_a_bucket():
    from atlas_rl.kernels.graphs import GraphCache, bucket

    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    cache = GraphCache(max_graphs=3, max_bytes=3 * 400)
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    for key in range(5):  # 400 bytes of input each
        cache.get(key, lambda: {"x": torch.zeros(100)}, fn)
    assert len(cache) == 3 and list(cache._graphs) == [2, 3, 4]
    small = GraphCache(max_graphs=10, max_bytes=500)
    for key in range(3):
        small.get(key, lambda: {"x": torch.zeros(100)}, fn)
    assert len(small) == 1  # the bytes bound, not the count, evicted
    graph = cache.get(3, lambda: {"x": torch.zeros(100)}, fn)
    graph.inputs["x"][:3] = 1.0  # the caller fills the buffers; the same object each time
    assert cache.get(3, lambda: {"x": torch.zeros(100)}, fn) is graph
    assert torch.equal(graph()[:4], torch.tensor([2.0, 2.0, 2.0, 0.0]))
