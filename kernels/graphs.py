"""CUDA graphs for the small per-step work of verification and drafting.

At the batch sizes of a rollout's tail (<= 8 sequences), verifying or drafting is a few
microseconds of device work spread over 4-30 kernel launches issued from Python, so each
call costs what the host takes to issue them (docs/gpu.md: 150-420 us a verification call,
0.4-0.8 ms a `propose`). vLLM captures its forward in CUDA graphs per batch-size bucket
for the same reason; this module does it for atlas-rl's own kernels:

- a `StaticGraph` owns input buffers of fixed shape (a bucket: the batch padded to a
  power of 2) and a function of them. The caller fills the inputs (copies into slices),
  calls it, and reads the outputs, which are clones: the graph's own output buffers are
  overwritten at the next replay. The first call warms the function up on a side stream
  (Triton compiles, the allocator settles) and captures it; every later call replays it;
- a `GraphCache` keeps the graphs by key, least recently used first out (each graph in
  its own memory pool: graphs of different buckets replay in no fixed order).

On the CPU (or with ``capture=False``) the same object runs the function eagerly on the
same static buffers: the padding and the buffer handling are what the CPU tests exercise,
and the CUDA tests check that a replay returns what the eager call returns. A capture that
fails (a function that synchronises, an unsupported op, being inside another capture) is
logged once and that key runs eagerly from then on: the result is the same, only slower.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def bucket(n: int, floor: int = 1) -> int:
    """The power of 2 >= n (>= floor): batch sizes share a graph per bucket."""
    n = max(int(n), int(floor), 1)
    return 1 << (n - 1).bit_length()


class StaticGraph:
    """``fn(**inputs)`` on fixed input buffers, replayed as a CUDA graph where it can be.

    ``fn`` returns a tensor or a tuple of tensors and must not synchronise with the host
    nor allocate shapes that depend on the data (what a CUDA graph cannot hold)."""

    WARMUP = 2

    def __init__(self, inputs: dict[str, torch.Tensor], fn: Callable, *, capture: bool = True,
                 name: str = "graph"):
        self.inputs = inputs
        self.fn = fn
        self.name = name
        device = next(iter(inputs.values())).device
        self.capture = bool(capture) and device.type == "cuda"
        self.graph = None
        self._outputs = None
        self.failed: str | None = None  # why this graph runs eagerly

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP):
                self.fn(**self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(**self.inputs)
        self.graph, self._outputs = graph, out

    def __call__(self):
        """Run on the current contents of ``inputs``; returns clones of the outputs."""
        if self.capture and self.graph is None and self.failed is None:
            if torch.cuda.is_current_stream_capturing():
                return self.fn(**self.inputs)  # inside someone else's graph: part of it
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 (eager gives the same result)
                self.failed = f"{type(e).__name__}: {e}"
                self.graph = None
                logger.warning("atlas-rl: CUDA graph %s not captured (%s); it runs eagerly",
                               self.name, self.failed)
        if self.graph is None:
            return self.fn(**self.inputs)  # eager outputs are fresh tensors already
        self.graph.replay()
        out = self._outputs
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


class GraphCache:
    """`StaticGraph`s by key (shapes, dtypes, variant), at most ``max_graphs`` and
    ``max_bytes`` of input buffers (a verification bucket holds up to 64 MB of logits),
    least recently used evicted."""

    def __init__(self, max_graphs: int = 48, capture: bool = True, max_bytes: int = 1 << 30):
        self.max_graphs = int(max_graphs)
        self.max_bytes = int(max_bytes)
        self.capture = bool(capture)
        self._graphs: OrderedDict = OrderedDict()
        self._bytes: dict = {}

    def get(self, key, make_inputs: Callable[[], dict[str, torch.Tensor]], fn: Callable,
            name: str = "graph") -> StaticGraph:
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        inputs = make_inputs()
        graph = StaticGraph(inputs, fn, capture=self.capture, name=name)
        self._graphs[key] = graph
        self._bytes[key] = sum(t.numel() * t.element_size() for t in inputs.values())
        while len(self._graphs) > 1 and (len(self._graphs) > self.max_graphs
                                         or sum(self._bytes.values()) > self.max_bytes):
            old, _ = self._graphs.popitem(last=False)
            del self._bytes[old]
        return graph

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._bytes.clear()
