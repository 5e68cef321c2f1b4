"""AtlasConfig (a TRL-style dataclass) and the built-in prompt sets."""

from __future__ import annotations

import pytest

from atlas_rl import AtlasConfig
from atlas_rl.workloads import (code_prompts, extract_answer, javascript_prompts, math_prompts,
                                mixed_prompts)


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


def test_javascript_prompts_are_the_stdlib_tasks_as_jsdoc_and_a_header():
    prompts = javascript_prompts(20, seed=1)
    assert len(prompts) == 20 and all(p.domain == "javascript" for p in prompts)
    assert all(p.prompt.startswith("/**\n * ") and p.prompt.endswith(") {\n")
               and "\nfunction " in p.prompt and "def " not in p.prompt for p in prompts)
    assert javascript_prompts(5, seed=1)[0].prompt == prompts[0].prompt  # seeded
    tasks = {p.meta["function"] for p in javascript_prompts(300, seed=0)}
    assert tasks == {p.meta["function"] for p in code_prompts(300, seed=0)}  # same tasks


@pytest.mark.parametrize("text, finished, want", [
    ("  return a + '}';\n}\n", True, 1.0),       # a brace in a string does not count
    ("  // }\n  return [a];\n}", True, 1.0),      # nor one in a comment
    ("  return [a;\n}\n", True, 0.0),             # mismatched
    ("  if (a) { return 1; }\n", False, 0.0),      # the function never closes
    ("", True, 0.0),                               # nothing written
])
def test_js_function_reward_checks_the_function_closes(text, finished, want):
    from atlas_rl.rewards import js_function_reward, rollout_reward

    prompt = "/**\n * Add.\n */\nfunction add(a, ...rest) {\n"
    assert js_function_reward(prompt, text, finished) == want
    r = rollout_reward(text, None, 10, 100, finished, prompt, language="javascript")
    assert r == pytest.approx(0.5 * want + 0.2 * (0.9 if finished else 0.0) + 0.1 * 1.0)


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


def test_builtin_prompt_sets_for_a_broad_distillation_mix():
    """`builtin:NAME[:COUNT]`: the distillation's broad mix without a dataset: code in
    other languages (never JavaScript, the benchmark's unseen domain, nor Python), and
    chat instructions; distinct prompts, reproducible by seed; bad specs name the fix."""
    from atlas_rl.workloads import CODE_LANGUAGES, builtin_prompts

    langs = builtin_prompts("builtin:code-languages:5000")
    assert len(langs) == 5000
    assert {p.meta["language"] for p in langs} == set(CODE_LANGUAGES)
    assert not {"JavaScript", "TypeScript", "Python"} & set(CODE_LANGUAGES)
    assert len({p.prompt[0]["content"] for p in langs}) > 1000
    chat = builtin_prompts("builtin:instructions:300", seed=2)
    assert len({p.prompt[0]["content"] for p in chat}) == 300  # 300 distinct of the ~1,600
    assert all(p.domain == "instructions" and p.prompt[0]["role"] == "user" for p in chat)
    assert [p.prompt for p in chat] == [p.prompt for p in builtin_prompts("builtin:instructions:300", 2)]
    assert len(builtin_prompts("builtin:code")) == 1000
    with pytest.raises(ValueError, match="unknown prompt set 'builtin:poems'.*code-languages"):
        builtin_prompts("builtin:poems")
    with pytest.raises(ValueError, match="COUNT must be a whole number, got 'ten'"):
        builtin_prompts("builtin:math:ten")
