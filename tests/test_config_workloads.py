"""AtlasConfig (a TRL-style dataclass) and the built-in prompt sets."""

from __future__ import annotations

import pytest

from atlas_rl import AtlasConfig
from atlas_rl.workloads import code_prompts, extract_answer, math_prompts, mixed_prompts


def test_config_parses_from_cli_flags_like_a_trl_config():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(AtlasConfig).parse_args_into_dataclasses(
        ["--max_lookahead", "4", "--explore", "0.2", "--max_speculation_batch_size", "16"])
    assert cfg.max_lookahead == 4 and cfg.explore == 0.2 and cfg.max_speculation_batch_size == 16
    assert AtlasConfig().max_speculation_batch_size is None  # no knob needed: the cost model
    help_text = HfArgumentParser(AtlasConfig).format_help()
    assert "cost model, measured online" in " ".join(help_text.split())


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_lookahead=0), "max_lookahead"),
    (dict(explore=1.5), "explore"),
    (dict(train_budget_fraction=2.0), "train_budget_fraction"),
    (dict(draft_vocab_size=1), "draft_vocab_size"),
    (dict(logprobs_mode="fancy"), "logprobs_mode"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AtlasConfig(**kwargs)


def test_code_prompts_come_from_stdlib_docstrings():
    prompts = code_prompts(20, seed=1)
    assert len(prompts) == 20 and all(p.domain == "code" for p in prompts)
    assert all(p.prompt.startswith("def ") and '"""' in p.prompt for p in prompts)
    assert code_prompts(5, seed=1)[0].prompt == prompts[0].prompt  # seeded


def test_math_prompts_have_checkable_answers():
    for p in math_prompts(30, seed=2):
        assert p.domain == "math" and p.prompt[-1]["role"] == "user"
        assert int(p.answer) >= 0
    assert extract_answer("12 + 3 = 15\nAnswer: 1,215.") == "1215"
    assert extract_answer("no number") is None
    mixed = mixed_prompts(6)
    assert [p.domain for p in mixed] == ["code", "math"] * 3


def test_recipe_yaml_loads_into_atlas_config():
    from pathlib import Path

    from transformers import HfArgumentParser

    recipe = Path(__file__).parents[1] / "recipes" / "atlas_default.yaml"
    (cfg,) = HfArgumentParser(AtlasConfig).parse_yaml_file(str(recipe))
    assert cfg == AtlasConfig()  # the recipe writes out the defaults
