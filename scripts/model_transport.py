"""Carry a policy's weights to a machine whose calls take at most so many MiB each (the
lent GPU machine: 64 MiB a call, the working tree included), losslessly.

    python scripts/model_transport.py pack MODEL_DIR OUT_DIR --part-mib 58
    python scripts/model_transport.py unpack PART0 PART1 ... --out MODEL_DIR   (there)

`pack` writes OUT_DIR/part0, part1, ...: one archive of the model directory in which
model.safetensors' 16-bit words are split into their high bytes (sign and exponent:
xz-compressed to ~36%) and low bytes (mantissa: stored as they are), with the file's
SHA-256. SmolLM2-135M in bfloat16: 269 MB -> 175 MiB, three parts of 58 MiB. `unpack`
joins the parts, restores the file byte for byte and checks the hash. Only stdlib and
numpy are needed on either side.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import struct
import tarfile
from pathlib import Path

import numpy as np


def pack(model_dir: Path, out_dir: Path, part_mib: float) -> list[Path]:
    raw = (model_dir / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head, data = raw[:8 + n], raw[8 + n:]
    if len(data) % 2:
        raise ValueError(f"{model_dir}/model.safetensors: its tensors are not all 16-bit "
                         f"(odd data length); this packer splits 16-bit words only")
    words = np.frombuffer(data, dtype=np.uint8).reshape(-1, 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, blob: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name != "model.safetensors":
                add("files/" + f.name, lzma.compress(f.read_bytes()))
        add("head.bin", head)
        add("hi.xz", lzma.compress(words[:, 1].tobytes(), preset=6))
        add("lo.raw", words[:, 0].tobytes())
        add("sha256", hashlib.sha256(raw).hexdigest().encode())
    blob = buf.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(part_mib * 2**20)
    parts = []
    for i, s in enumerate(range(0, len(blob), size)):
        p = out_dir / f"part{i}"
        p.write_bytes(blob[s:s + size])
        parts.append(p)
    print(f"{model_dir} -> {len(parts)} parts, {len(blob) / 2**20:.1f} MiB in all "
          f"(model.safetensors {len(raw) / 2**20:.1f} MiB)")
    return parts


def unpack(parts: list[Path], out: Path) -> None:
    blob = b"".join(p.read_bytes() for p in parts)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        def get(name: str) -> bytes:
            return tar.extractfile(name).read()

        for m in tar.getmembers():
            if m.name.startswith("files/"):
                (out / m.name[len("files/"):]).write_bytes(lzma.decompress(get(m.name)))
        hi = np.frombuffer(lzma.decompress(get("hi.xz")), dtype=np.uint8)
        lo = np.frombuffer(get("lo.raw"), dtype=np.uint8)
        words = np.empty((len(lo), 2), dtype=np.uint8)
        words[:, 0], words[:, 1] = lo, hi
        raw = get("head.bin") + words.tobytes()
        want = get("sha256").decode()
    got = hashlib.sha256(raw).hexdigest()
    if got != want:
        raise SystemExit(f"model_transport: SHA-256 {got} != {want}: a part is missing, "
                         f"out of order or damaged")
    (out / "model.safetensors").write_bytes(raw)
    print(f"{out}: model.safetensors restored, SHA-256 {got[:16]}... checked")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--part-mib", type=float, default=58.0)
    u = sub.add_parser("unpack")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.model_dir, args.out_dir, args.part_mib)
    else:
        unpack(sorted(args.parts, key=lambda q: int(q.name.removeprefix("part") or 0)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
