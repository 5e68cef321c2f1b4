"""scripts/model_transport.py: a model directory split into parts small enough for the
GPU machine's calls comes back byte for byte, and a damaged part is refused."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent


def _transport():
    spec = importlib.util.spec_from_file_location("model_transport",
                                                  ROOT / "scripts" / "model_transport.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_packed_model_comes_back_byte_for_byte_and_damage_is_refused(tmp_path):
    mt = _transport()
    src = tmp_path / "model"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"a": (torch.randn(300, 64, generator=g) * 0.02).to(torch.bfloat16),
               "b": torch.randn(7, generator=g).to(torch.bfloat16)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "llama"}')
    parts = mt.pack(src, tmp_path / "parts", part_mib=0.01)
    assert len(parts) >= 3  # split into several calls' worth
    out = tmp_path / "back"
    mt.unpack(parts, out)
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    sizes = [p.stat().st_size for p in parts]
    blob = bytearray(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(fileobj=io.BytesIO(bytes(blob))) as tar:
        lo = tar.getmember("lo.raw").offset_data
    blob[lo + 100] ^= 0x01  # one mantissa bit of one weight
    at = 0
    for p, n in zip(parts, sizes):
        p.write_bytes(bytes(blob[at:at + n]))
        at += n
    with pytest.raises(SystemExit, match="SHA-256"):
        mt.unpack(parts, tmp_path / "damaged")
