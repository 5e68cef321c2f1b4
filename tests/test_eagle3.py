"""The EAGLE-3-class drafter on a synthetic policy (no vLLM): the acceptance-targeted loss
is the acceptance rejection sampling gives, training lowers it, drafting computes what
training unrolled, a candidate that does not beat the published drafter is not published,
and state round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from atlas_rl.kernels.rejection import rejection_sample
from atlas_rl.speculators.distill import (expected_length, tv_loss, unrolled_acceptance,
                                          unrolled_loss, vocab_targets)
from atlas_rl.speculators.drafter_net import Eagle3Net
from atlas_rl.speculators.eagle3 import Eagle3Speculator

V, D = 64, 32


class SyntheticPolicy:
    """State h_t (normed); features at three 'layers' = (A1 h, A2 h, h); the final hidden
    state is h; x_{t+1} ~ softmax(E h_t); h_{t+1} = norm(B h_t + E x_{t+1})."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(V, D, generator=g) * 0.5
        self.B = torch.randn(D, D, generator=g) / D ** 0.5
        self.A1 = torch.randn(D, D, generator=g) / D ** 0.5
        self.A2 = torch.randn(D, D, generator=g) / D ** 0.5
        self.g = g

    @staticmethod
    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def rollout(self, length):
        h = self.norm(torch.randn(D, generator=self.g))
        hs, toks = [], []
        for _ in range(length):
            x = int(torch.multinomial(torch.softmax(self.embed @ h, -1), 1, generator=self.g))
            hs.append(h)
            toks.append(x)
            h = self.norm(self.B @ h + self.embed[x])
        hs = torch.stack(hs)
        aux = torch.cat([hs @ self.A1.T, hs @ self.A2.T, hs], -1)
        return aux, hs, toks


def _net(window=4, seed=0):
    torch.manual_seed(seed)
    return Eagle3Net(D, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     window=window)


def _speculator(policy, net=None, **kw):
    spec = Eagle3Speculator(net or _net(), torch.arange(V), aux_layers=(1, 2, 3), **kw)
    spec.attach_target(policy.embed, policy.embed)
    return spec


def _capture(spec, policy, key, length, start=5, chunk=3):
    aux, hs, toks = policy.rollout(length)
    for s in range(0, length, chunk):  # as the proposer does: a few positions per step
        spec.capture(key, hs[s:s + chunk], toks[s:s + chunk], start + s, aux=aux[s:s + chunk])
    return aux, hs, toks


def test_distribution_draft_acceptance_is_one_minus_tv():
    """Rejection sampling accepts a draft x ~ q with probability sum_v min(p_v, q_v) =
    1 - TV(p, q); `tv_loss` (without its cross-entropy term) is exactly TV, also when q
    lives on a draft vocabulary that leaves some of p's mass out."""
    g = torch.Generator().manual_seed(0)
    vocab = torch.arange(0, 40)                       # q's support: 40 of 50 tokens
    logits_p = torch.randn(50, generator=g) * 1.5
    logits_q = torch.randn(40, generator=g) * 1.5 + logits_p[:40] * 0.5
    p = torch.softmax(logits_p, -1)
    q = torch.softmax(logits_q, -1)
    tv = tv_loss(logits_q[None], p[vocab][None], (1 - p[vocab].sum())[None], kl_weight=0.0)
    assert float(tv) == pytest.approx(1 - float(torch.minimum(p[vocab], q).sum()), abs=1e-6)

    n = 40000
    drafts = vocab[torch.multinomial(q, n, replacement=True, generator=g)]
    out = rejection_sample(drafts, [1] * n, logits_p.expand(n, -1).clone(),
                           torch.zeros(n, dtype=torch.long), torch.rand(n, generator=g),
                           torch.rand(n, generator=g), 1, draft_probs=q.expand(n, -1).clone(),
                           draft_ids=vocab.expand(n, -1).clone(), backend="torch")
    accepted = float((out[:, 0] == drafts).float().mean())
    sigma = (accepted * (1 - accepted) / n) ** 0.5
    assert abs(accepted - (1 - float(tv))) < 4 * sigma + 1e-3


def _batch(policy, n, length, steps):
    aux_l, fin_l, tok_l = [], [], []
    for _ in range(n):
        aux, hs, toks = policy.rollout(length)
        aux_l.append(aux); fin_l.append(hs); tok_l.append(torch.tensor(toks))
    T = length - steps
    aux = torch.stack(aux_l)[:, :T]
    final = torch.stack(fin_l)
    tok = torch.stack(tok_l)[:, :T + steps - 1]
    pos = torch.arange(T).expand(n, -1)
    valid = torch.ones((n, length), dtype=torch.bool)
    emb = policy.embed[tok]
    p_sub, p_out = vocab_targets(final, policy.embed, torch.arange(V))
    return aux, emb, pos, valid, p_sub, p_out


def test_unrolled_training_lowers_the_loss_and_raises_acceptance():
    policy = SyntheticPolicy(1)
    net = _net(window=8)
    steps = 3
    held = _batch(policy, 8, 24, steps)
    before_loss, _ = unrolled_loss(net, *held[:4], policy.embed, *held[4:], steps)
    before = unrolled_acceptance(net, *held[:4], policy.embed, *held[4:], steps)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(80):
        b = _batch(policy, 8, 24, steps)
        loss, _ = unrolled_loss(net, *b[:4], policy.embed, *b[4:], steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after_loss, _ = unrolled_loss(net, *held[:4], policy.embed, *held[4:], steps)
    after = unrolled_acceptance(net, *held[:4], policy.embed, *held[4:], steps)
    assert float(after_loss) < 0.8 * float(before_loss)
    assert expected_length(after["distribution"]) > expected_length(before["distribution"]) + 0.1
    # every position improved, the later ones (fed the drafter's own outputs) included
    assert all(a > b for a, b in zip(after["distribution"], before["distribution"]))


def test_drafting_computes_what_training_unrolls():
    """propose() (per-request keys/values over a window, draft steps fed back) gives the
    q that `Eagle3Net.unroll` computes for the same tokens: training-time test trains
    the function that drafts."""
    policy = SyntheticPolicy(2)
    spec = _speculator(policy, net=_net(window=4, seed=3), frozen=True)
    spec.draft_dtype = torch.float32  # the same numbers as training (bf16: its own test)
    aux, hs, toks = _capture(spec, policy, "r", 10, start=7)
    k = 3
    (draft,) = spec.propose(["r"], [[0] * 20], [k], sample=[True])
    assert len(draft.tokens) == k and draft.q.shape == (k, V)
    # the same computation, unrolled: the last position, fed the drafted tokens
    emb = policy.embed[torch.tensor(toks + draft.tokens[:k - 1])][None]   # x_{t+1}, d1, d2
    pos = (7 + torch.arange(10))[None]
    valid = torch.ones((1, 10), dtype=torch.bool)
    with torch.no_grad():
        ys = spec.net.unroll(aux[None], emb[:, :10 + k - 1], pos, valid, k)
    for j in range(k):
        q = torch.softmax(ys[j][0, -1] @ policy.embed.T, -1)
        torch.testing.assert_close(draft.q[j], q, atol=2e-5, rtol=1e-4)
    assert torch.allclose(draft.q.sum(-1), torch.ones(k), atol=1e-5)


def test_drafting_in_bfloat16_keeps_q_exact_and_the_drafts_of_float32():
    """Drafting in bfloat16 (the default on CPUs with bf16 units): q is a float32
    distribution and the drafts are sampled from it (what verification needs to stay
    exact), and where float32's choice is clear bfloat16 drafts the same token."""
    policy = SyntheticPolicy(5)
    f32 = _speculator(policy, net=_net(window=4, seed=3), frozen=True)
    b16 = _speculator(policy, net=_net(window=4, seed=3), frozen=True)
    f32.draft_dtype, b16.draft_dtype = torch.float32, torch.bfloat16
    keys = [f"r{i}" for i in range(12)]
    for key in keys:
        aux, hs, toks = policy.rollout(8)
        for spec in (f32, b16):
            spec.capture(key, hs, toks, 3, aux=aux)
    want = f32.propose(keys, [[0]] * len(keys), [3] * len(keys), sample=[True] * len(keys))
    got = b16.propose(keys, [[0]] * len(keys), [3] * len(keys), sample=[True] * len(keys))
    same_first = 0
    for a, b in zip(want, got):
        assert b.q.dtype == torch.float32 and torch.allclose(b.q.sum(-1), torch.ones(3), atol=1e-5)
        for j, t in enumerate(b.tokens):  # the token's confidence is its q
            assert b.confidence[j] == pytest.approx(float(b.q[j, t]), rel=1e-6)
        # bf16 moves q a little, not a lot
        assert float((a.q - b.q).abs().sum(-1).max()) < 0.15
        same_first += a.tokens[0] == b.tokens[0]
    assert same_first >= len(keys) // 2
    # greedy drafts where float32's top choice is clear: the same tokens
    want = f32.propose(keys, [[0]] * len(keys), [1] * len(keys))
    got = b16.propose(keys, [[0]] * len(keys), [1] * len(keys))
    clear = [i for i, d in enumerate(want) if d.confidence[0] > 0.6]
    assert clear and all(got[i].tokens == want[i].tokens for i in clear)


def test_a_gap_in_positions_starts_the_request_afresh():
    policy = SyntheticPolicy(4)
    spec = _speculator(policy, frozen=True)
    _capture(spec, policy, "r", 6, start=0)
    aux, hs, toks = policy.rollout(2)
    spec.capture("r", hs, toks, 50, aux=aux)        # preempted and recomputed elsewhere
    assert len(spec._slots.keys_of("r")) == 2 and int(spec._slots.pos[spec._slots.slot["r"]]) == 51


def test_a_steps_batched_capture_equals_capturing_each_request():
    """The proposer hands a step's rows of every request at once (`capture_batch`: one
    fusion, one key/value projection, one scatter into ring-indexed slots); drafts and
    learning rows are those of capturing request by request, across window wrap-around
    and requests that finish and free their slots."""
    policy = SyntheticPolicy(7)
    one, many = _speculator(policy, net=_net(seed=3)), _speculator(policy, net=_net(seed=3))
    one.draft_dtype = many.draft_dtype = torch.float32  # batched and single rows: same sums
    rollouts = {f"r{i}": policy.rollout(9 + i) for i in range(3)}
    for s in range(0, 12, 3):
        keys, hidden, aux, toks, firsts, offs = [], [], [], [], [], []
        for key, (a, h, t) in rollouts.items():
            if s >= len(t):
                continue
            m = min(3, len(t) - s)
            one.capture(key, h[s:s + m], t[s:s + m], 5 + s, aux=a[s:s + m])
            keys.append(key)
            offs.append(sum(len(x) for x in toks))
            hidden.append(h[s:s + m])
            aux.append(a[s:s + m])
            toks.append(t[s:s + m])
            firsts.append(5 + s)
        many.capture_batch(keys, torch.cat(hidden), toks, firsts, offs, aux=torch.cat(aux))
        got = many.propose(keys, [[0]] * len(keys), [3] * len(keys))
        want = one.propose(keys, [[0]] * len(keys), [3] * len(keys))
        for a, b in zip(got, want):
            assert a.tokens == b.tokens and a.confidence == pytest.approx(b.confidence, abs=1e-5)
    one.finish("r0"), many.finish("r0")
    assert "r0" not in many._slots and len(many._slots) == 2
    (a,), (b,) = one.take_captured()[:1], many.take_captured()[:1]
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


def test_candidate_that_does_not_beat_the_published_drafter_is_not_published():
    policy = SyntheticPolicy(5)
    spec = _speculator(policy, lr=3e-3, batch_rollouts=8, steps=2)
    for i in range(16):
        _capture(spec, policy, f"a{i}", 20)
        spec.finish(f"a{i}")
    stats = spec.learn(time_budget=None)
    assert stats["drafter_published"] == 1.0 and spec.version == 1
    assert stats["drafter_candidate_score"] > stats["drafter_published_score"]

    weights = {k: v.clone() for k, v in spec.net.state_dict().items()}
    spec.lr = 50.0  # a destructive update: the candidate is far worse on held-out rollouts
    spec._optimizer_state = None
    for i in range(16):
        _capture(spec, policy, f"b{i}", 20)
        spec.finish(f"b{i}")
    stats = spec.learn(time_budget=None)
    assert stats["drafter_published"] == 0.0
    assert stats["drafter_candidate_score"] <= stats["drafter_published_score"]
    assert spec.version == 1 and spec.rollbacks == 1
    for k, v in spec.net.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_frozen_drafter_does_not_learn_and_state_round_trips(tmp_path):
    policy = SyntheticPolicy(6)
    spec = _speculator(policy, frozen=True)
    _capture(spec, policy, "r", 8)
    assert spec.learn(time_budget=None) == {}
    spec.save(tmp_path)
    again = Eagle3Speculator.from_dir(tmp_path, frozen=True)
    again.attach_target(policy.embed, policy.embed)
    assert again.aux_layers == (1, 2, 3) and again.net.window == 4
    aux, hs, toks = policy.rollout(6)
    for s in (spec, again):
        s.capture("x", hs, toks, 0, aux=aux)
    (a,), (b,) = spec.propose(["x"], [[0]], [4]), again.propose(["x"], [[0]], [4])
    assert a.tokens == b.tokens and a.confidence == pytest.approx(b.confidence)


def test_bad_drafter_setting_is_refused_with_the_choices():
    from atlas_rl import AtlasConfig

    with pytest.raises(ValueError, match="'auto', 'eagle3' or 'mlp'"):
        AtlasConfig(drafter="eagle")


# --- through vLLM (real model) ------------------------------------------------------------


@pytest.fixture(scope="module")
def eagle3_dir(real_model_path, tmp_path_factory):
    """An EAGLE-3 drafter for SmolLM2, initialised from its top layer (untrained): enough
    for the mechanics, not for acceptance."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from atlas_rl.speculators.eagle3_distill import default_aux_layers, save_drafter

    cfg = AutoConfig.from_pretrained(real_model_path)
    net = Eagle3Net.for_policy(cfg, window=16)
    net.init_from_policy_layer(load_file(f"{real_model_path}/model.safetensors"),
                               cfg.num_hidden_layers - 1)
    out = tmp_path_factory.mktemp("eagle3")
    save_drafter(out, net, torch.arange(4096), default_aux_layers(cfg.num_hidden_layers))
    return str(out)


@pytest.mark.slow
def test_eagle3_in_vllm_reads_the_policys_layers_and_stays_exact(make_engine, real_model_path,
                                                                 eagle3_dir):
    """The seam row hands the drafter the policy's residual stream at its three layers,
    equal to transformers' hidden states there; drafting with it keeps greedy output
    identical to no speculation, and the adaptive drafter learns within its budget."""
    from atlas_rl.backends.vllm import hooks
    from atlas_rl.exactness import greedy_mismatches, load_reference_model
    from atlas_rl.workloads import code_prompts

    prompts = [p.prompt for p in code_prompts(2, seed=3)]
    base = make_engine(real_model_path, "none", dtype="float32")
    engine = make_engine(real_model_path, "atlas", dtype="float32", static_speculator=eagle3_dir,
                         drafter="eagle3", speculate_always=True)
    spec = engine.speculators["neural"]
    assert isinstance(spec, Eagle3Speculator) and not spec.frozen
    assert "applied" in hooks.status()["aux_hidden_states"]
    seen = []
    capture = spec.capture_batch

    def spy(keys, hidden, tokens, first_positions, offsets, aux=None):
        for key, toks, first, off in zip(keys, tokens, first_positions, offsets):
            rows = None if aux is None else aux[off:off + len(toks)].clone()
            seen.append((key, list(toks), first, rows))
        return capture(keys, hidden, tokens, first_positions, offsets, aux=aux)

    spec.capture_batch = spy
    try:
        want = base.generate(prompts, temperature=0.0, max_tokens=24)
        got = engine.generate(prompts, temperature=0.0, max_tokens=24)
    finally:
        del spec.capture_batch
    assert greedy_mismatches([c.completion_ids for c in want], [c.completion_ids for c in got]) == []
    assert seen and all(a is not None and a.shape[1] == 3 * 576 for *_, a in seen)

    # the features equal transformers' hidden states at those layers (vLLM numbering)
    model = load_reference_model(real_model_path)
    checked = 0
    for c in got.completions:
        ids = c.prompt_ids + c.completion_ids
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        ref = torch.cat([hs[layer][0] for layer in spec.aux_layers], -1)
        for key in {k for k, *_ in seen}:
            rows = [(first + i, t, a[i]) for k, toks, first, a in seen if k == key
                    for i, t in enumerate(toks)]
            if not all(pos + 1 < len(ids) and ids[pos + 1] == t for pos, t, _ in rows):
                continue  # another completion's request
            for pos, _, a in rows:
                torch.testing.assert_close(a, ref[pos], atol=2e-3, rtol=2e-3)
                checked += 1
    assert checked >= 20

    stats = engine.learn([c.prompt_ids + c.completion_ids for c in got], rollout_seconds=30.0)
    assert "drafter_published" in stats and stats["drafter_version"] >= 0


# --- resumable distillation (tiny model, transformers generator) ---------------------------

RESUME_PROMPTS = ["def add(a, b):", "The capital of France is", "Once upon a time",
                  "Question: 2 + 3 = ?", "import os\n", "Dear Sir,", "SELECT * FROM",
                  "The best way to learn is", "for i in range(10):", "x = [1, 2, 3]\n"]


def _resumable(tiny_model_path, tmp_path, work, out, **overrides):
    from atlas_rl.speculators.eagle3_distill import Eagle3DistillConfig

    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in RESUME_PROMPTS))
    kwargs = dict(model=tiny_model_path, prompts=[str(prompts)], out=str(out),
                  work_dir=str(work), completions=2, max_tokens=12, gen_batch=4, train_batch=4,
                  draft_vocab_size=128, holdout=0.2, round_prompts=2, vocab_prompts=4,
                  time_budget=1e6, max_rounds=1, generator="transformers")
    kwargs.update(overrides)
    return Eagle3DistillConfig(**kwargs)


def test_resumable_distillation_continues_where_the_last_run_stopped(tiny_model_path, tmp_path):
    """Two runs of one round each reach exactly the drafter, optimizer and held-out curve
    of one run of two rounds: the work directory carries everything (rollouts, held-out
    set, draft vocabulary, drafter, optimizer, prompt cursor); each round draws new
    prompts; the drafter in `out` is rewritten in float16 after every round and loads;
    `compare_to` scores another drafter on the same held-out set."""
    from safetensors.torch import load_file

    from atlas_rl.speculators.eagle3 import Eagle3Speculator
    from atlas_rl.speculators.eagle3_distill import distil_resumable

    quiet = lambda *a: None  # noqa: E731
    once = distil_resumable(_resumable(tiny_model_path, tmp_path, tmp_path / "a", tmp_path / "oa",
                                       max_rounds=2), say=quiet)
    first = distil_resumable(_resumable(tiny_model_path, tmp_path, tmp_path / "b",
                                        tmp_path / "ob"), say=quiet)
    assert first["rounds"] == 1 and first["train_steps"] >= 1
    second = distil_resumable(_resumable(tiny_model_path, tmp_path, tmp_path / "b",
                                         tmp_path / "ob", save_dtype="float16",
                                         compare_to=str(tmp_path / "oa")), say=quiet)
    assert second["rounds"] == once["rounds"] == 2
    assert second["train_steps"] == once["train_steps"] > first["train_steps"]
    assert second["train_tokens"] == once["train_tokens"]
    assert [c["tokens"] for c in second["curve"]] == [c["tokens"] for c in once["curve"]]
    assert second["curve"][-1]["distribution"] == once["curve"][-1]["distribution"]
    assert len(second["runs"]) == 2 and len(once["runs"]) == 1
    # --compare-to: another drafter on the same held-out set (here the uninterrupted
    # run's, equal to where this one ends)
    assert second["reference"]["distribution"] == once["curve"][-1]["distribution"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for name, value in a["trainer"]["net"].items():
        assert torch.equal(value, b["trainer"]["net"][name]), name
    assert a["trainer"]["opt"]["state"][0]["step"] == b["trainer"]["opt"]["state"][0]["step"]
    assert b["state"]["next_prompt"] == 4 + 2  # round 1 took the vocabulary's 4, round 2 two more
    shards = sorted(p.name for p in (tmp_path / "b" / "rollouts").iterdir())
    assert shards == ["round-00000.json", "round-00001.json"]
    r0, r1 = (json.loads((tmp_path / "b" / "rollouts" / s).read_text()) for s in shards)
    assert not {tuple(p) for p, _ in r0} & {tuple(p) for p, _ in r1}  # new prompts, not epochs
    saved = load_file(str(tmp_path / "ob" / "eagle3.safetensors"))
    assert all(v.dtype == torch.float16 for k, v in saved.items() if k.startswith("net."))
    spec = Eagle3Speculator.from_dir(tmp_path / "ob")
    for name, value in b["trainer"]["net"].items():
        torch.testing.assert_close(spec.net.state_dict()[name], value.half().float())
    report = json.loads((tmp_path / "ob" / "train_report.json").read_text())
    assert report["train_tokens"] == second["train_tokens"] and report["runs"][0]["machine"]["cpu"]


def test_resumable_distillation_refuses_a_work_dir_of_other_settings(tiny_model_path, tmp_path):
    from atlas_rl.speculators.eagle3_distill import distil_resumable

    distil_resumable(_resumable(tiny_model_path, tmp_path, tmp_path / "w", tmp_path / "o"),
                     say=lambda *a: None)
    with pytest.raises(ValueError, match=r"other settings \(draft_vocab_size: 128 there, 64 now\)"
                                         r".*another --work-dir"):
        distil_resumable(_resumable(tiny_model_path, tmp_path, tmp_path / "w", tmp_path / "o",
                                    draft_vocab_size=64), say=lambda *a: None)
