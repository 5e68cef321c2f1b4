"""Host-to-device copies of the small per-step arrays of verification and drafting (draft
counts, token ids, flags), without waiting for the GPU and without a pinned allocation per
call.

A copy from pageable host memory waits for the work already queued on the stream; a
non-blocking copy from pinned memory does not, but ``tensor.pin_memory()`` allocates
pinned memory (cudaHostAlloc) on every call, which costs more than the kernels it feeds
(measured on an H100: verification of one request took ~155 us per call whatever its
size). So the host side copies into one of a few pinned buffers kept per device, used in
turn; an event recorded after each copy guards a buffer's reuse (a wait only if the GPU
is that many copies behind)."""

from __future__ import annotations

import torch

SLOTS = 8


class PinnedStaging:
    """A ring of ``SLOTS`` growing pinned buffers for one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None] * SLOTS
        self._events: list[torch.cuda.Event | None] = [None] * SLOTS
        self._next = 0

    def copy(self, host: torch.Tensor) -> torch.Tensor:
        i, self._next = self._next, (self._next + 1) % SLOTS
        event = self._events[i]
        if event is not None:
            event.synchronize()  # the copy that used this buffer SLOTS calls ago is done
        host = host.contiguous()
        nbytes = host.numel() * host.element_size()
        buf = self._buffers[i]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 4096), dtype=torch.uint8, pin_memory=True)
            self._buffers[i] = buf
        staged = buf[:nbytes].view(host.dtype).view(host.shape)
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        if event is None:
            event = self._events[i] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return out


_STAGING: dict[torch.device, PinnedStaging] = {}


def to_device(values, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``values`` (a host list or tensor) on ``device``; on CUDA without a stream sync and
    without a pinned allocation (module docstring)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    device = torch.device("cuda", device.index if device.index is not None
                          else torch.cuda.current_device())
    staging = _STAGING.get(device)
    if staging is None:
        staging = _STAGING[device] = PinnedStaging(device)
    return staging.copy(t)
