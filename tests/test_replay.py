"""Adaptation replayed offline (`atlas_rl.replay`): recipes parse and refuse what they
cannot set, the paired interval is right, every drafter is scored on a batch before the
adaptive one learns it, adaptation on a domain's rows raises its score where a frozen
drafter's stays, and the capture (real vLLM, a tiny model) is the engine's rows, cached."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.replay import (CapturedBatch, Recipe, ReplayConfig, by_domain_step, capture,
                             continues, drafter_acceptance, expected_lengths, format_replay,
                             load_drafter, paired_ratio, policy_probs, replay)
from atlas_rl.config import AtlasConfig
from atlas_rl.speculators.distill import acceptance


def test_recipes_parse_and_name_what_they_cannot_set():
    r = Recipe.parse("fast:lr=3e-3,max_epochs=4,gate=false")
    assert (r.name, r.get("lr"), r.get("max_epochs"), r.get("gate")) == ("fast", 3e-3, 4, False)
    assert r.get("budget_s") == 0.34  # the engine's default where the recipe is silent
    assert Recipe.parse("default").settings == {}
    with pytest.raises(ValueError, match="unknown setting.*'learning_rate'.*choose from.*lr"):
        Recipe.parse("x:learning_rate=1")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        Recipe.parse("x:lr")
    with pytest.raises(ValueError, match="not a number"):
        Recipe.parse("x:lr=fast")
    # the gate is a word (AtlasConfig.drafter_publish_gate), the engine's by default
    assert Recipe.parse("g:gate=held-out").get("gate") == "held-out"
    assert Recipe.parse("default").get("gate") == AtlasConfig().drafter_publish_gate


def test_paired_ratio_and_its_interval():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(640, generator=g)
    ratio, lo, hi = paired_ratio(1.2 * b, b)
    assert ratio == pytest.approx(1.2) and lo == pytest.approx(1.2) and hi == pytest.approx(1.2)
    noisy = b + 0.1 * torch.randn(640, generator=g)
    ratio, lo, hi = paired_ratio(noisy, b)
    assert lo < ratio < hi and hi - lo < 0.2
    assert all(x != x for x in paired_ratio(b[:10], b[:10]))  # fewer rows than a block


def _world(seed=0, V=96, d=16):
    """A policy's tensors and a 'domain': completions of 8 positions whose next hidden
    state is a fixed map of the current one and the sampled token, so that a drafter can
    learn it (rows chain within a completion as the engine's capture does)."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(V, d, generator=g)
    head = torch.randn(V, d, generator=g) * 2
    mix = torch.randn(2 * d, d, generator=g) / d ** 0.5

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    def batch(step, completions=32, length=8):
        hs, toks, targets = [], [], []
        for _ in range(completions):
            h = norm(torch.randn(1, d, generator=g))
            for _ in range(length):
                tok = torch.randint(V, (1,), generator=g)
                nxt = norm(torch.cat([h, embed[tok]], -1) @ mix)
                hs.append(h), toks.append(tok), targets.append(nxt)
                h = nxt
        tok = torch.cat(toks)
        return CapturedBatch(step, "dom", torch.cat(hs), tok, torch.cat(targets), tok)

    return embed, head, batch


def _trained(embed, head, batch, directory=None):
    spec = load_drafter(None, embed, head, Recipe("x", {"lr": 1e-2}))
    b = batch(0)
    spec.add_captured((b.h, b.tok, b.target))
    spec._foreign_tokens = [b.sampled]
    for _ in range(4):
        spec.learn(time_budget=None)
    if directory is not None:
        spec.save(directory)
    return spec


def test_first_position_is_the_distribution_drafts_acceptance_and_later_ones_chain():
    embed, head, batch = _world()
    spec = _trained(embed, head, batch)
    b = batch(1, completions=4)
    p = policy_probs(b, head)
    alpha = drafter_acceptance(spec, b, p, lookahead=3)
    want = acceptance(spec.net, embed, head, spec.vocab, b.h, b.tok, b.target)
    assert float(alpha[:, 0].mean()) == pytest.approx(want["accept_distribution"], rel=1e-5)
    # position 2 at row 0: the drafter's own output fed back with the token sampled next,
    # against p one position on
    with torch.no_grad():
        head_sub = head.index_select(0, spec.vocab)
        y1 = spec.net(b.h[:1], embed[b.tok[:1]])
        y2 = spec.net(y1, embed[b.tok[1:2]])
        q2 = torch.softmax(y2 @ head_sub.T, -1)
        a2 = torch.minimum(p[1:2].index_select(1, spec.vocab), q2).sum()
    assert float(alpha[0, 1]) == pytest.approx(float(a2), rel=1e-5)
    # a completion's last rows have nothing to draft past its end
    assert continues(b).tolist() == ([True] * 7 + [False]) * 4
    assert (alpha[7::8, 1:] == 0).all() and (alpha[6::8, 2] == 0).all()
    assert (alpha[6::8, 1] > 0).all()
    assert torch.equal(expected_lengths(torch.tensor([[0.5, 0.5, 1.0]])), torch.tensor([2.0]))


def test_replay_scores_each_batch_before_learning_it_and_adaptation_learns(tmp_path):
    """The same batch twice: the first copy is scored before any update (the adaptive
    drafter equals the static one there), the second after learning it (higher); the
    frozen drafter scores both alike."""
    embed, head, batch = _world()
    _trained(embed, head, batch, tmp_path / "static")
    b = batch(1)
    again = CapturedBatch(2, "dom", b.h, b.tok, b.target, b.sampled)
    res = replay([b, again], embed, head, str(tmp_path / "static"), None,
                 [Recipe("default", {"budget_s": 5.0, "max_epochs": 8, "lr": 1e-2})],
                 say=lambda *a: None)
    fixed, adapt = res["steps"], res["recipes"]["default"]["steps"]
    for m in ("accept1", "length"):
        assert fixed[0][m]["static"] == pytest.approx(fixed[1][m]["static"])
        assert adapt[0][m]["adaptive"] == pytest.approx(fixed[0][m]["static"], abs=1e-6)
        assert adapt[0][m]["vs_static"][0] == pytest.approx(1.0, abs=1e-6)
        assert adapt[1][m]["vs_static"][1] > 1.0  # the interval's low end, too
    assert adapt[1]["accept1"]["adaptive"] > adapt[0]["accept1"]["adaptive"] + 0.02
    assert res["recipes"]["default"]["updates"][0]["drafter_rows"] > 0
    rows = by_domain_step(res, "default")
    assert [r["domain_step"] for r in rows] == [1, 2]
    assert "recipe default" in format_replay(res)


def test_capture_keeps_the_engines_rows_per_batch_and_caches_them(tiny_model_path, tmp_path):
    cfg = ReplayConfig(model=tiny_model_path, steps=2, completions=2, max_tokens=6)
    batches, where = capture(cfg, say=lambda *a: None, directory=tmp_path)
    assert where.is_file() and len(batches) == 4  # 2 steps x (RL tail, fixed-length tail)
    assert [b.domain for b in batches] == ["javascript"] * 2 + ["code-php"] * 2
    for b in batches:
        # a completion of n tokens makes n - 1 rows (the last sampled token has no next)
        assert len(b.tok) == len(b.h) == len(b.target) >= 2
        assert len(b.sampled) >= len(b.tok)
    fixed_length = batches[1]  # ignore_eos: 2 completions x 6 tokens, 5 rows each
    assert len(fixed_length.tok) == 2 * 5
    # within a completion, a row's next hidden state is the next row's hidden state
    chained = fixed_length.h[1:].eq(fixed_length.target[:-1]).all(-1)
    assert chained.tolist() == [True] * 4 + [False] + [True] * 4
    again, where2 = capture(cfg, say=lambda *a: None, directory=tmp_path)
    assert where2 == where and all(torch.equal(x.h, y.h) for x, y in zip(batches, again))
