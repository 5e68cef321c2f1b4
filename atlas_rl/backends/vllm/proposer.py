"""AtlasProposer: the class vLLM instantiates for ``speculative_config={"method":
"custom_class", "model": "atlas_rl.backends.vllm.proposer.AtlasProposer"}``.

It owns no policy logic. Each decode step, inside the worker, it
1. reads acceptance feedback: a request that had a k-token draft verified and now
   shows m sampled tokens had m - 1 of them accepted (rejection sampling keeps the
   accepted prefix and adds one token, the bonus or the correction); the controller
   calibrates the drafting arm from it and measures the step's time for its cost model;
2. hands the policy's hidden states at the sampled positions to speculators that use
   them (the neural drafter drafts from them and learns from them later);
3. asks the controller for a step plan, the speculators for drafts, and the controller
   for each request's choice and the goodput cut across the batch;
4. returns one token list per request (lengths may differ, empty = no draft), and keeps
   the distribution drafts' q for vLLM's rejection sampler (`take_last_draft_probs`).
Nothing escapes into vLLM: a failing speculator means no drafts for that step,
logged once and counted in ``speculator_errors``.

vLLM's ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, ...)`` names
requests only by their row in the batch. To key drafts and feedback by request id we
wrap ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it) so that
the runner tells the proposer the batch's request ids, how many draft tokens were
verified per request, and which requests finished.
"""

from __future__ import annotations

import inspect
import logging
import time
import weakref

import torch

from atlas_rl.kernels.rejection import pack_sparse_q
from atlas_rl.metrics import SpecCounters
from atlas_rl.speculators.base import EMPTY_DRAFT, Draft

logger = logging.getLogger(__name__)

# Proposers built in this process (in-process engines), newest last.
_PROPOSERS: "weakref.WeakSet[AtlasProposer]" = weakref.WeakSet()


def _install_runner_hook() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from atlas_rl.backends.vllm import verifier
    from atlas_rl.compat import vllm_draft_probs

    original = GPUModelRunner.propose_draft_token_ids
    if getattr(original, "_atlas_hook", False):
        return
    signature = inspect.signature(original)

    def propose_draft_token_ids(self, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, AtlasProposer):
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        metadata = bound.get("spec_decode_metadata")
        scheduler_output = bound.get("scheduler_output")
        drafter.begin_step(
            req_ids=list(self.input_batch.req_ids),
            num_verified=None if metadata is None else list(metadata.num_draft_tokens),
            finished=getattr(scheduler_output, "finished_req_ids", ()),
            num_scheduled_tokens=getattr(scheduler_output, "total_num_scheduled_tokens", None),
            sample_hidden_states=bound.get("sample_hidden_states"),
        )
        if drafter.verifier == "atlas" and not verifier.attached(self):
            verifier.attach(self)
        out = original(self, *args, **kwargs)
        try:
            vllm_draft_probs.hand_over(self, drafter, packed=verifier.attached(self))
        except Exception as e:  # noqa: BLE001 (without q, drafts are verified one-hot: exact)
            self._draft_probs = self._draft_prob_req_ids = None
            drafter._speculator_failed(None, e)
        return out

    propose_draft_token_ids._atlas_hook = True
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids


class AtlasProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.speculators: dict[str, object] = {}
        self.controller = None
        self.target_model = None
        self.counters = SpecCounters()
        self._pending: dict[str, Draft] = {}  # req_id -> Draft handed to vLLM last step
        self._step = None
        self._step_end: float | None = None
        self._draft_probs = None  # (num_reqs, [(row, Draft)]) of the last distribution step
        self.verifier = "atlas"  # who verifies: "atlas" (sparse q) or "vllm"; set by the engine
        self._error_logged = False
        _install_runner_hook()
        _PROPOSERS.add(self)

    @property
    def speculator(self):
        """The first speculator (single-speculator setups)."""
        return next(iter(self.speculators.values()), None)

    def attach(self, speculators, controller) -> None:
        """Called by the engine once vLLM built us: until then we draft nothing.
        `speculators`: name -> Speculator (or a single Speculator)."""
        if controller.max_lookahead > self.num_speculative_tokens:
            raise ValueError(
                f"controller max_lookahead {controller.max_lookahead} exceeds vLLM's "
                f"num_speculative_tokens {self.num_speculative_tokens}")
        if not isinstance(speculators, dict):
            speculators = {speculators.name: speculators}
        self.speculators = dict(speculators)
        self.controller = controller
        for spec in self.speculators.values():
            if getattr(spec, "uses_hidden_states", False) and self.target_model is not None:
                spec.attach_target(*target_embeddings(self.target_model))

    def load_model(self, target_model) -> None:
        """vLLM hands us the target model: the neural drafter shares its embedding and
        LM head (references, so weight syncs reach it)."""
        self.target_model = target_model

    def begin_batch(self) -> None:
        self._step_end = None

    def begin_step(self, req_ids, num_verified, finished, num_scheduled_tokens=None,
                   sample_hidden_states=None) -> None:
        now = time.perf_counter()
        self._step = (req_ids, num_verified, sample_hidden_states)
        if self.controller is not None and self._step_end is not None and num_scheduled_tokens:
            drafted = sum(num_verified) if num_verified is not None else 0
            # Only pure decode steps (no prompt chunk in them) say what decoding costs.
            if num_scheduled_tokens == len(req_ids) + drafted:
                self.controller.observe_step(len(req_ids), drafted, now - self._step_end)
        for rid in finished or ():
            self._pending.pop(rid, None)
            for spec in self.speculators.values():
                try:
                    spec.finish(rid)
                except Exception as e:  # noqa: BLE001 (never into vLLM)
                    self._speculator_failed(spec, e)

    def _take_sparse_q(self):
        """The last proposal's draft distributions as (ids, q), both [num_reqs, k, S]
        (S the widest support; padding has probability 0), or None when every draft was
        one-hot. One-hot drafts in the same step get q = 1 on their token (verification
        is then the same as without q)."""
        last, self._draft_probs = self._draft_probs, None
        if last is None:
            return None
        num_reqs, handed = last
        k = max(len(d) for _, d in handed)
        width = max(d.q_ids.shape[-1] for _, d in handed if d.is_distribution)
        ids = torch.zeros(num_reqs, k, width, dtype=torch.long)
        q = torch.zeros(num_reqs, k, width)
        for row, draft in handed:
            n = len(draft)
            if draft.is_distribution:
                s = draft.q_ids.shape[-1]
                ids[row, :n, :s] = draft.q_ids[:n]
                q[row, :n, :s] = draft.q[:n]
            else:  # one-hot: support {x}
                ids[row, :n, 0] = torch.tensor(draft.tokens)
                q[row, :n, 0] = 1.0
        return ids, q

    def take_last_draft_probs(self):
        """[num_reqs, k, vocab] draft distributions of the last proposal, or None when
        every draft was one-hot (vLLM's runner reads this right after `propose`)."""
        sparse = self._take_sparse_q()
        if sparse is None:
            return None
        ids, q = sparse
        dense = torch.zeros(*ids.shape[:2], self.vocab_size)
        return dense.scatter_add_(2, ids, q)

    def take_last_packed_q(self):
        """The same distributions packed sparse for atlas-rl's verifier
        (`kernels.rejection.pack_sparse_q`: [num_reqs, k, 2S]), or None."""
        sparse = self._take_sparse_q()
        return None if sparse is None else pack_sparse_q(*sparse, self.vocab_size)

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **_ignored) -> list[list[int]]:
        num_reqs = len(sampled_token_ids)
        empty = [[] for _ in range(num_reqs)]
        step, self._step = self._step, None
        self._draft_probs = None
        start = time.perf_counter()
        try:
            if not self.speculators or step is None or len(step[0]) != num_reqs:
                return empty
            return self._propose(step, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        except Exception as e:  # noqa: BLE001 (a failing speculator must not kill a rollout)
            self._speculator_failed(None, e)
            self._pending.clear()
            self._draft_probs = None
            return empty
        finally:
            end = time.perf_counter()
            self.counters.propose_seconds += end - start
            self._step_end = end

    def _propose(self, step, sampled_token_ids, num_tokens_no_spec, token_ids_cpu):
        req_ids, num_verified, hidden = step
        counters, controller = self.counters, self.controller
        rows, keys, contexts = [], [], []
        capture = [s for s in self.speculators.values() if getattr(s, "uses_hidden_states", False)]
        offsets = self._hidden_offsets(num_verified, len(req_ids), hidden) if capture else None
        if offsets is not None:  # one copy per step: vLLM reuses the buffer
            hidden = hidden.detach().to("cpu", torch.float32, copy=True)
        for row, rid in enumerate(req_ids):
            sampled = sampled_token_ids[row]
            draft = self._pending.pop(rid, EMPTY_DRAFT)
            if not sampled:  # a partial prefill chunk or a discarded request: no draft
                continue
            verified = len(draft) if num_verified is None else min(num_verified[row], len(draft))
            if verified:
                accepted = min(len(sampled) - 1, verified)
                counters.record_verified(verified, accepted, draft.source, draft.is_distribution)
                verified_draft = draft.truncate(verified)
                controller.observe(verified_draft, accepted)
                spec = self.speculators.get(draft.source)
                if spec is not None:
                    spec.feedback(rid, verified_draft, accepted)
            n = int(num_tokens_no_spec[row])
            if offsets is not None:
                m = len(sampled)
                rows_h = hidden[offsets[row]:offsets[row] + m]
                for spec in capture:
                    spec.observe(rid, rows_h, sampled, n - m - 1)
            rows.append(row)
            keys.append(rid)
            contexts.append(token_ids_cpu[row, :n])

        out = [[] for _ in req_ids]
        plan = controller.begin_step(len(keys))
        if plan.lookahead == 0 or not keys:
            for _ in keys:
                counters.request_steps += 1
                counters.record_lookahead(0)
            return out
        # Never draft past the model length: the verifier needs room for k + 1.
        max_lens = [max(0, min(plan.lookahead, self.max_model_len - len(c) - 1)) for c in contexts]
        start = time.perf_counter()
        candidates = [[] for _ in keys]
        for name in plan.arms:
            spec = self.speculators[name]
            k = plan.lookaheads.get(name, plan.lookahead)
            t0 = time.perf_counter()
            try:
                drafts = spec.propose(keys, contexts, [min(m, k) for m in max_lens],
                                      sample=plan.sample[name])
            except Exception as e:  # noqa: BLE001 (one speculator failing leaves the others)
                self._speculator_failed(spec, e)
                continue
            controller.observe_draft_time(name, time.perf_counter() - t0)
            for cands, d in zip(candidates, drafts):
                if d.tokens:
                    d.source = d.source or name
                    cands.append(d)
        drafts = controller.choose(candidates, len(keys))
        drafts = [d.truncate(min(self.num_speculative_tokens, m)) for d, m in zip(drafts, max_lens)]
        counters.draft_seconds += time.perf_counter() - start
        handed = []
        for row, rid, draft in zip(rows, keys, drafts):
            counters.request_steps += 1
            counters.record_lookahead(len(draft))
            if not draft.tokens:
                continue
            self._pending[rid] = draft
            out[row] = list(draft.tokens)
            handed.append((row, draft))
        if any(d.is_distribution for _, d in handed):
            self._draft_probs = (len(req_ids), handed)
        return out

    @staticmethod
    def _hidden_offsets(num_verified, num_reqs, hidden):
        """Row of each request's first sampled position in `sample_hidden_states`
        (vLLM samples at k + 1 positions of a request with a k-token draft)."""
        if hidden is None:
            return None
        sizes = [1] * num_reqs if num_verified is None else [k + 1 for k in num_verified]
        if sum(sizes) != hidden.shape[0]:
            return None  # a layout we do not know: draft from tokens only
        offsets, total = [], 0
        for s in sizes:
            offsets.append(total)
            total += s
        return offsets

    def _speculator_failed(self, spec, error: Exception) -> None:
        self.counters.speculator_errors += 1
        if not self._error_logged:
            self._error_logged = True
            logger.warning("atlas-rl: speculator %s failed (%s: %s); drafting nothing from it "
                           "for this step. Later failures are counted, not logged.",
                           getattr(spec, "name", "?"), type(error).__name__, error)


def target_embeddings(model):
    """(token embedding [V, d], LM head [V, d]) of a vLLM causal LM."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is None:
        weight = model.model.embed_tokens.weight
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is None or head.dim() != 2 or head.shape != weight.shape:
        head = weight  # tied
    return weight, head
