"""`AtlasRejectionSampler`: the sampling step of an atlas engine (hook ``atlas_sampler``).

A subclass of vLLM's ``RejectionSampler`` given to the model runner of atlas engines
only (`attach`); engines without atlas-rl's speculative config, the benchmark's vLLM
peers included, keep vLLM's stock sampler. Three choices per step, in this order:

1. **No draft anywhere in the batch, a step vLLM would sample like one without
   speculation** (`plain_sampling_applies`): vLLM's plain ``Sampler``, the path of an
   engine without speculation. vLLM 0.32 sends every step of a speculative engine through
   the rejection sampler, drafts or not: a bonus-sampler pass, a [batch, vocab] zero-fill,
   scatter, gather and a second log_softmax (logprobs ~1e-6 off no-speculation's), and the
   random-sample kernel for zero tokens; at batch 64 that was ~15 ms of a ~200 ms step
   (docs/bench/history.md, "Steps without drafts"). The plain path draws the same random numbers
   (per-request generators and the global one), so the same tokens, and logprobs
   bit-identical to an engine without speculation. Self-check: on the first such step per
   logprobs mode, a synthetic batch (greedy, random, seeded and unseeded rows) is sampled
   both ways (plain, and this sampler's no-draft path of choice 2); the plain path is kept only if tokens, random-number use, logprob ids and
   ranks agree exactly and logprobs within 1e-5. CPU only (where it was measured).
2. **atlas-rl verifies** (``verifier="atlas"``, every request random, q packed sparse or
   one-hot drafts): the rejection step is `atlas_rl.kernels.rejection.rejection_sample`.
   Draft distributions arrive packed (`kernels.rejection.pack_sparse_q`, [tokens, 2S])
   through vLLM's draft-probability path; p is normalised with one logsumexp per row, the
   full row and the residual only where a draft token was rejected, and the recovered
   token comes from one uniform per request (inverse CDF) instead of [requests, vocab]
   exponential noise. The acceptance uniforms come from vLLM's ``generate_uniform_probs``
   (per-request generators for seeded requests); the recovery uniform of a seeded request
   with drafts from its generator, of the others from the global one. Seeded runs are
   reproducible, not bit-identical to vLLM's rejection sampler (other draws); the
   distribution is exactly p either way (tests/test_exactness.py, tests/test_verifier.py).
   Where nothing but vLLM's logits processors and the temperature shapes the bonus rows
   (every request random, no top-k/top-p, on the CPU: `draws_bonus_itself`), vLLM's
   sampler does not draw every request's bonus token ahead (Gumbel noise over each bonus
   row: ~1.5-1.9 ms at 4 requests of 49,152 logits on 2 cores, for tokens that most
   requests, rejecting a draft, never use): the rows are processed as it would
   (`_processed_bonus_logits`) and the verifier draws a bonus token only for requests
   that accepted every draft (or had none), from the same per-request uniform that
   would otherwise draw its recovered token (a seeded request's from its generator).
   At temperature 1 without top-k/top-p the temperature division is skipped (exact).
   A step with no draft token at all (and choice 1 not taken: e.g. penalties with
   leftover spec tokens, a thinking budget, logprobs of chosen token ids), greedy, random
   or mixed, skips the rejection step: its output is the bonus tokens (nothing to accept
   or recover), without vLLM's [batch, vocab] recovered-token noise.
3. **Otherwise vLLM verifies** (greedy or mixed batches, synthetic acceptance, dense q,
   ``verifier="vllm"``): ``RejectionSampler.forward``, a packed q expanded to the dense
   rows it expects first.

The logprobs of the output tokens (`_get_logprobs_tensors`) are computed at the
positions that hold an output token only, not over every draft position as vLLM 0.32
does, with the verifier's log-sum-exps where it has them (processed logprobs); same
values to rounding, ranks and top-k (`output_logprobs`).

``ATLAS_RL_COMPAT=off`` turns choice 1 and the no-draft shortcut of choice 2 off (steps
without drafts go through vLLM's rejection sampler). Version-gated: `attach` checks the signatures it relies on (vLLM 0.32) and
leaves vLLM's sampler in place, saying so, where they differ.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace

import torch
from vllm.v1.sample import rejection_sampler as rs

from atlas_rl.backends.vllm import hooks
from atlas_rl.kernels.rejection import is_packed, rejection_sample, unpack_sparse_q

logger = logging.getLogger(__name__)

_FORWARD_PARAMS = ("self", "metadata", "draft_probs", "logits", "sampling_metadata")
_LOGPROBS_PARAMS = ("self", "max_num_logprobs", "metadata", "logits", "target_logits",
                    "bonus_logits", "sampled_token_ids")
# the bonus rows processed as vLLM's sampler does before its draw (atlas draws them)
_BONUS_PARAMS = ("self", "logits", "sampling_metadata", "predict_bonus_token")
_TEMPERATURE_PARAMS = ("logits", "temp", "all_random")
_NEEDED = ("apply_sampling_constraints", "generate_uniform_probs", "PLACEHOLDER_TOKEN_ID")
_plain_verdict: dict[str | None, bool] = {}  # logprobs mode -> the self-check's verdict


def _unsupported() -> str | None:
    """Why this vLLM's rejection sampler is not the one the subclass was written for."""
    cls = rs.RejectionSampler
    if tuple(inspect.signature(cls.forward).parameters) != _FORWARD_PARAMS:
        return "RejectionSampler.forward's signature changed"
    if tuple(inspect.signature(cls._get_logprobs_tensors).parameters) != _LOGPROBS_PARAMS:
        return "RejectionSampler._get_logprobs_tensors's signature changed"
    from vllm.v1.sample.sampler import Sampler

    if tuple(inspect.signature(Sampler.apply_logits_processors).parameters) != _BONUS_PARAMS:
        return "Sampler.apply_logits_processors's signature changed"
    if tuple(inspect.signature(Sampler.apply_temperature).parameters) != _TEMPERATURE_PARAMS:
        return "Sampler.apply_temperature's signature changed"
    missing = [name for name in _NEEDED if not hasattr(rs, name)]
    return f"vllm.v1.sample.rejection_sampler lacks {missing}" if missing else None


def attach(runner, atlas_verifies: bool) -> bool:
    """Give `runner` an `AtlasRejectionSampler` (idempotent). False where it cannot: vLLM
    changed, or the runner has no rejection sampler; vLLM's sampler verifies then."""
    sampler = getattr(runner, "rejection_sampler", None)
    if sampler is None:
        return False
    if not isinstance(sampler, AtlasRejectionSampler):
        problem = _unsupported()
        if problem is not None:
            hooks.record("atlas_sampler", f"not applicable: {problem}; vLLM's sampler verifies")
            logger.warning("atlas-rl: %s", hooks.status()["atlas_sampler"])
            return False
        hooks.retype(sampler, AtlasRejectionSampler, key="atlas_sampler")
        hooks.assign(sampler, {"atlas_calls": {"atlas": 0, "vllm": 0},
                               "atlas_nonfinite_rows": 0, "atlas_failed": []},
                     key="atlas_sampler")
    hooks.assign(sampler, {"atlas_verifies": bool(atlas_verifies)}, key="atlas_sampler")
    _record_status(atlas_verifies)
    _hand_failed_requests_over(runner, sampler)
    return True


# --- requests whose tokens came from NaN or inf logits ---------------------------------

def _hand_failed_requests_over(runner, sampler) -> None:
    """After each sampling step, name the requests whose tokens were drawn from NaN or inf
    logits (`AtlasRejectionSampler.atlas_failed`) in vLLM's own per-request field,
    ``ModelRunnerOutput.num_nans_in_logits``, which reaches the scheduler in whatever
    process it runs; `fail_nonfinite_requests` finishes them there with an error."""
    original = getattr(runner, "sample_tokens", None)
    if original is None:  # a runner of another shape: the requests are counted, not failed
        return

    def sample_tokens(*args, **kwargs):
        sampler.atlas_failed = []
        output = original(*args, **kwargs)
        failed, sampler.atlas_failed = sampler.atlas_failed, []
        req_ids = getattr(output, "req_ids", None)
        if failed and req_ids is not None and hasattr(output, "num_nans_in_logits"):
            nans = dict(output.num_nans_in_logits or {})
            for index in failed:
                nans[req_ids[index]] = max(1, nans.get(req_ids[index], 0))
            output.num_nans_in_logits = nans
        return output

    if hooks.patch(runner, "sample_tokens", sample_tokens, key="failed_requests"):
        fail_nonfinite_requests()  # the scheduler of an in-process engine


_SCHEDULER_PARAMS = ("self", "scheduler_output", "model_runner_output")


def fail_nonfinite_requests() -> None:
    """Make the scheduler finish a request of an atlas engine whose ``ModelRunnerOutput``
    reports NaN or inf logits with vLLM's ``FINISHED_ERROR`` (finish_reason "error"; the
    OpenAI server answers 500, ``LLM.generate`` returns it, `AtlasRolloutEngine.generate`
    raises), and say so in the log. The tokens of that step are delivered with the error
    finish, none after it. Engines without atlas-rl's speculative config are left as
    vLLM has them (vLLM fills the field itself only with VLLM_COMPUTE_NANS_IN_LOGITS=1, for
    its statistics). Installed in every process (the plugin; the in-process engine's
    `attach`); idempotent."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.update_from_output
    if hooks.hook_of(original) == "failed_requests":
        return
    if tuple(inspect.signature(original).parameters) != _SCHEDULER_PARAMS:
        hooks.record("failed_requests", "not applied: Scheduler.update_from_output's "
                     "signature changed; requests with NaN or inf logits are counted, not failed")
        return

    def update_from_output(self, scheduler_output, model_runner_output):
        failed = _reported_failed(self, model_runner_output)
        outputs = original(self, scheduler_output, model_runner_output)
        if failed:
            _finish_with_error(self, outputs, failed)
        return outputs

    hooks.patch(Scheduler, "update_from_output", update_from_output, key="failed_requests")
    hooks.record("failed_requests", "applied")


def _reported_failed(scheduler, model_runner_output) -> list[str]:
    nans = getattr(model_runner_output, "num_nans_in_logits", None)
    if not nans or not _is_atlas_engine(scheduler):
        return []
    return [req_id for req_id, count in nans.items() if count]


def _is_atlas_engine(scheduler) -> bool:
    spec = getattr(getattr(scheduler, "vllm_config", None), "speculative_config", None)
    return getattr(spec, "method", None) == "custom_class" and \
        getattr(spec, "model", None) == hooks.PROPOSER_CLASS


def _finish_with_error(scheduler, outputs, failed: list[str]) -> None:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    failed_set, carried = set(failed), set()
    for batch in outputs.values():
        for out in batch.outputs:
            if out.request_id in failed_set:
                out.finish_reason = FinishReason.ERROR
                carried.add(out.request_id)
    for request in scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR):
        if request.request_id not in carried:
            error = EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                     finish_reason=FinishReason.ERROR)
            if request.client_index in outputs:
                outputs[request.client_index].outputs.append(error)
            else:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[error])
    logger.error("atlas-rl: request(s) %s failed: the policy's logits were NaN or inf where "
                 "their next token was drawn, so that token is not a sample of the policy "
                 "(diverged weights or activations, e.g. a bf16 overflow after an update); "
                 "the engine goes on serving the others", ", ".join(sorted(failed_set)))


def _record_status(atlas_verifies: bool) -> None:
    verdicts = {True: "plain sampler", False: "rejection sampler (the self-check failed)"}
    plain = ", ".join(f"{mode}: {verdicts[ok]}" for mode, ok in _plain_verdict.items())
    hooks.record("atlas_sampler", "applied: " + (
        "atlas-rl verifies (sparse q)" if atlas_verifies else "vLLM's rejection step verifies")
        + f"; steps without drafts: {plain or 'self-check pending (first such step)'}")


def verifies(runner) -> bool:
    """Whether atlas-rl's verifier checks this runner's drafts (then q travels packed)."""
    return bool(getattr(getattr(runner, "rejection_sampler", None), "atlas_verifies", False))


class AtlasRejectionSampler(rs.RejectionSampler):
    """vLLM's rejection sampler with atlas-rl's sampling step (module docstring). Adds no
    state of its own beyond ``atlas_verifies`` and ``atlas_calls`` (set by `attach`)."""

    atlas_verifies: bool = True
    atlas_calls: dict[str, int]
    atlas_nonfinite_rows: int = 0  # logits rows seen NaN or inf (verification, logprobs)
    atlas_failed: list[int]  # this step's requests (batch rows) whose tokens they drew
    atlas_failed_requests: int = 0  # requests failed for it (cumulative)
    _unchecked: str | None = None
    _counted: int = 0

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        # Which logits rows drew tokens without a log-sum-exp of ours to show whether
        # they are finite: "plain" (the plain sampler: one row per request), "all",
        # "bonus" (vLLM's sampler drew the bonus tokens) or None.
        self._unchecked, self._counted = "all", 0
        out = self._forward(metadata, draft_probs, logits, sampling_metadata)
        if logits is not None and (self._counted or self._unchecked):
            self._find_failed(metadata, logits, out)
        return out

    def _find_failed(self, metadata, logits, out) -> None:
        """`atlas_failed`: the requests with a NaN or +inf logit in a row their tokens came
        from. On a plain step that returned logprobs, the sampled tokens' own (NaN or inf
        exactly where their row holds a NaN or +inf: free); otherwise a row sum (NaN or
        +inf; -inf alone is a masked token) over the unchecked rows, all of them once the
        verifier has counted one."""
        whole = self._counted or self._unchecked != "bonus"
        lp = getattr(out, "logprobs_tensors", None)
        mode = str(getattr(self.sampler, "logprobs_mode", ""))
        if self._unchecked == "plain" and lp is not None and mode.endswith("logprobs"):
            bad = ~torch.isfinite(lp.logprobs[:, 0])
        else:
            rows = logits if whole else logits[metadata.bonus_logits_indices]
            total = rows.sum(-1, dtype=torch.float32)
            bad = torch.isnan(total) | (total == float("inf"))
        if not bool(bad.any()):
            return
        if not self._counted:
            self._note_nonfinite(int(bad.sum()), "sampled rows")
        counts = torch.as_tensor([int(c) for c in metadata.num_draft_tokens], dtype=torch.long)
        owner = (torch.repeat_interleave(torch.arange(len(counts)), counts + 1)
                 if bad.shape[0] != len(counts) else torch.arange(len(counts)))
        self.atlas_failed = sorted(set(owner[bad.cpu()].tolist()))
        self.atlas_failed_requests += len(self.atlas_failed)

    def _forward(self, metadata, draft_probs, logits, sampling_metadata):
        if self._plain_step(metadata, draft_probs, logits, sampling_metadata):
            self._unchecked = "plain"  # (after the self-check, which samples batches too)
            return self.sampler(logits=logits, sampling_metadata=sampling_metadata)
        if (metadata.max_spec_len == 0 and draft_probs is None and not self.synthetic_mode
                and hooks.enabled()):  # no draft anywhere: nothing to accept or recover
            return self._sample(metadata, None, logits, sampling_metadata)
        vocab_size = logits.shape[-1]
        packed = is_packed(draft_probs, vocab_size)
        if (self.atlas_verifies and not self.synthetic_mode and sampling_metadata.all_random
                and (draft_probs is None or packed)):
            self.atlas_calls["atlas"] += 1
            return self._sample(metadata, draft_probs, logits, sampling_metadata)
        self.atlas_calls["vllm"] += 1
        self._unchecked = "all"
        if packed:  # e.g. greedy and random requests in one batch: vLLM verifies, densely
            ids, q = unpack_sparse_q(draft_probs)
            draft_probs = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32,
                                      device=logits.device).scatter_add_(1, ids.clamp(min=0), q.float())
        return super().forward(metadata, draft_probs, logits, sampling_metadata)

    # --- 1. steps without drafts: the plain sampler ------------------------------------

    def _plain_step(self, metadata, draft_probs, logits, sampling_metadata) -> bool:
        if not hooks.enabled() or logits is None or logits.device.type != "cpu":
            return False
        mode = getattr(self.sampler, "logprobs_mode", None)
        if not _plain_verdict.get(mode, True) or not plain_sampling_applies(
                self, metadata, draft_probs, logits, sampling_metadata):
            return False
        if mode not in _plain_verdict:  # the self-check, once per logprobs mode
            try:
                problem = (None if hooks.tested_version() else "written for vLLM 0.32") \
                    or plain_matches_rejection(self, logits.shape[-1])
            except Exception as e:  # noqa: BLE001 (a failed check keeps the rejection path)
                problem = f"{type(e).__name__}: {e}"
            _plain_verdict[mode] = problem is None
            if problem is not None:
                logger.warning("atlas-rl: steps without drafts keep the rejection sampler: "
                               "the plain sampler did not match it (%s)", problem)
            _record_status(self.atlas_verifies)
        return _plain_verdict[mode]

    # --- 2. atlas-rl verifies ----------------------------------------------------------

    def _sample(self, metadata, draft_probs, logits, sampling_metadata):
        """The processed target logits, atlas-rl's rejection step, the bonus tokens and
        the logprobs of the output tokens (the parts of vLLM's forward).

        Where the bonus rows need nothing but vLLM's logits processors and temperature
        (`draws_bonus_itself`), the bonus token is drawn by the rejection step, only
        for the requests that reach it (`kernels.rejection.rejection_sample`); otherwise
        vLLM's sampler draws every request's bonus token first, as vLLM does."""
        sm = sampling_metadata
        own_bonus = metadata.max_spec_len > 0 and draws_bonus_itself(sm, logits)
        # the verifier normalises every row it draws from; vLLM's sampler the bonus rows
        self._unchecked = None if own_bonus else "bonus"
        if own_bonus:
            bonus_ids, bonus_logits = None, self._processed_bonus_logits(logits, metadata, sm)
        else:
            bonus = self.sampler(
                logits=logits[metadata.bonus_logits_indices],
                sampling_metadata=replace(sm, max_num_logprobs=-1), predict_bonus_token=True,
                # the bonus rows' logits are needed below for their tokens' logprobs
                logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode
                else "raw_logits")
            bonus_ids, bonus_logits = bonus.sampled_token_ids, bonus.logprobs_tensors.logprobs
        raw_target = logits[metadata.target_logits_indices].to(torch.float32)
        # logits processors work in place: keep the raw rows for raw-logprobs modes
        target = raw_target if self.is_processed_logprobs_mode else raw_target.clone()
        target = self.apply_logits_processors(target, sm, metadata)
        if not constraints_are_identity(sm):  # temperature 1, no top-k/top-p: nothing to do
            target = rs.apply_sampling_constraints(target, metadata.cu_num_draft_tokens, sm)
        known: dict = {}  # the verifier's log-sum-exp of the rows it read
        if metadata.max_spec_len == 0:  # nothing drafted: nothing to accept or recover
            output = bonus_ids.reshape(-1, 1).to(torch.int32)
        else:
            output, known = self._verify(metadata, draft_probs, target, bonus_ids, bonus_logits,
                                         sm, own_bonus)
        logprobs = None
        if sm.max_num_logprobs is not None:
            if self.is_processed_logprobs_mode:
                # the rows the verifier normalised: its log-sum-exp serves them
                logprobs = self._logprobs(sm.max_num_logprobs, metadata, logits, target,
                                          bonus_logits, output, known.get("target_lse"),
                                          known.get("bonus_lse"))
            else:  # raw logprobs: the unprocessed rows
                raw_bonus = (logits[metadata.bonus_logits_indices].to(torch.float32)
                             if own_bonus else bonus_logits)
                logprobs = self._logprobs(sm.max_num_logprobs, metadata, logits, raw_target,
                                          raw_bonus, output)
        from vllm.v1.outputs import SamplerOutput

        return SamplerOutput(sampled_token_ids=output, logprobs_tensors=logprobs)

    def _processed_bonus_logits(self, logits, metadata, sm) -> torch.Tensor:
        """The bonus rows as vLLM's sampler processes them before its draw (a float32
        copy): its logits processors (bonus-token variant), the temperature, the
        argmax-invariant processors (`Sampler.forward` and `Sampler.sample`, every request
        random, no top-k/top-p)."""
        rows = logits[metadata.bonus_logits_indices].to(torch.float32)
        rows = self.sampler.apply_logits_processors(rows, sm, True)
        if not constraints_are_identity(sm):
            rows = self.sampler.apply_temperature(rows, sm.temperature, True)
        for processor in sm.logitsprocs.argmax_invariant:
            rows = processor.apply(rows)
        return rows

    def _verify(self, metadata, draft_probs, target_logits, bonus_ids, bonus_logits,
                sampling_metadata, own_bonus: bool):
        num_draft_tokens = metadata.num_draft_tokens
        device = target_logits.device
        generators = sampling_metadata.generators
        uniform = rs.generate_uniform_probs(metadata.draft_token_ids.shape[0], num_draft_tokens,
                                            generators, device)
        # one per request: its recovered token, or (own_bonus) its bonus token
        recovery = torch.rand(len(num_draft_tokens), dtype=torch.float64, device=device)
        for i, gen in generators.items():
            # like vLLM: no draws for requests without drafts, unless the bonus is ours
            if own_bonus or num_draft_tokens[i] > 0:
                recovery[i:i + 1].uniform_(generator=gen)
        ids = q = None
        if draft_probs is not None:
            ids, q = unpack_sparse_q(draft_probs)
        report: dict = {}
        out = rejection_sample(metadata.draft_token_ids, num_draft_tokens, target_logits,
                               bonus_ids, uniform, recovery, metadata.max_spec_len,
                               draft_probs=q, draft_ids=ids, report=report,
                               bonus_logits=bonus_logits if own_bonus else None)
        self._note_nonfinite(report.get("nonfinite_rows"), "draft positions")
        return out, report

    def _note_nonfinite(self, rows: int | None, where: str) -> None:
        """Count logits rows that are NaN or inf (`atlas_nonfinite_rows`, in the engine's
        stats); the engine fails the generate call whose completions hold their tokens."""
        if not rows:
            return
        self._counted += int(rows)
        if not self.atlas_nonfinite_rows:
            logger.error("atlas-rl: the policy's logits are NaN or inf in %d row(s) at %s: "
                         "tokens drawn there are not samples of the policy (diverged weights "
                         "or activations, e.g. a bf16 overflow)", rows, where)
        self.atlas_nonfinite_rows += int(rows)

    # --- logprobs of the output tokens -------------------------------------------------

    def _get_logprobs_tensors(self, max_num_logprobs, metadata, logits, target_logits,
                              bonus_logits, sampled_token_ids):
        return self._logprobs(max_num_logprobs, metadata, logits, target_logits, bonus_logits,
                              sampled_token_ids)

    def _logprobs(self, max_num_logprobs, metadata, logits, target_logits, bonus_logits,
                  sampled_token_ids, target_lse=None, bonus_lse=None):
        if max_num_logprobs is None or max_num_logprobs < 0 or self.is_logits_logprobs_mode:
            return super()._get_logprobs_tensors(max_num_logprobs, metadata, logits,
                                                 target_logits, bonus_logits, sampled_token_ids)
        report: dict = {}
        out = output_logprobs(int(max_num_logprobs), metadata, target_logits, bonus_logits,
                              sampled_token_ids, report, target_lse, bonus_lse)
        self._note_nonfinite(report.get("nonfinite_rows"), "output tokens")
        return out


def output_logprobs(k: int, metadata, target_logits, bonus_logits, sampled_token_ids,
                    report: dict | None = None, target_lse: torch.Tensor | None = None,
                    bonus_lse: torch.Tensor | None = None):
    """Logprob, rank and top-k of every output token; zeros at placeholder positions
    (vLLM filters them out afterwards).

    Only the rows that hold an output token are read (the accepted drafts, the recovered
    or bonus token: ~1 + accepted per request), each copied once out of its source
    (``target_logits`` or ``bonus_logits``); the rows of draft positions after a
    rejection are never touched, and no row is normalised whole: the token's logprob is
    its logit minus the row's log-sum-exp (``target_lse`` [target rows] and ``bonus_lse``
    [requests], the verifier's, where given; else computed here), its rank the number of
    logits at or above its own (vLLM counts normalised values at or above the token's:
    the same but where two logits one rounding step apart tie after the subtraction), the
    top-k the k largest logits
    minus the log-sum-exp (the same values as vLLM's ``topk`` of the normalised row).
    ``report`` receives ``nonfinite_rows``: rows whose log-sum-exp is NaN or inf, among
    those this function normalised itself (the verifier counts its own)."""
    from vllm.v1.outputs import LogprobsTensors

    device = target_logits.device
    n_target = target_logits.shape[0]
    n_rows = n_target + bonus_logits.shape[0]
    # final logits row (vLLM's layout) -> row of target_logits, or n_target + bonus row
    source = torch.empty(n_rows, dtype=torch.long, device=device)
    source[metadata.target_logits_indices] = torch.arange(n_target, device=device)
    source[metadata.bonus_logits_indices] = torch.arange(n_target, n_rows, device=device)
    starts = torch.zeros_like(metadata.cu_num_sampled_tokens)
    starts[1:] = metadata.cu_num_sampled_tokens[:-1]
    width = sampled_token_ids.shape[-1]
    final = (starts[:, None] + torch.arange(width, device=device)).flatten()
    final.clamp_(max=n_rows - 1)
    flat = sampled_token_ids.flatten()
    tokens = flat.to(torch.int64)
    tokens[tokens == rs.PLACEHOLDER_TOKEN_ID] = 0
    ids = torch.zeros(tokens.shape[0], k + 1, dtype=torch.int64, device=device)
    ids[:, 0] = tokens
    logprobs = torch.zeros(tokens.shape[0], k + 1, dtype=torch.float32, device=device)
    ranks = torch.zeros(tokens.shape[0], dtype=torch.int64, device=device)
    valid = (flat != rs.PLACEHOLDER_TOKEN_ID).nonzero().squeeze(1)
    src = source[final[valid]]
    nonfinite = 0
    from_target = src < n_target
    for out_pos, rows, logits, known_lse in (
            (valid[from_target], src[from_target], target_logits, target_lse),
            (valid[~from_target], src[~from_target] - n_target, bonus_logits, bonus_lse)):
        if not out_pos.numel():
            continue
        rows_logits = logits.index_select(0, rows).to(torch.float32)
        if known_lse is None:
            lse = torch.logsumexp(rows_logits, dim=-1, keepdim=True)
            nonfinite += int((~torch.isfinite(lse)).sum())
        else:
            lse = known_lse.index_select(0, rows)[:, None]
        token_logit = rows_logits.gather(1, tokens[out_pos, None])
        logprobs[out_pos, :1] = token_logit - lse
        ranks[out_pos] = (rows_logits >= token_logit).sum(-1)
        if k:
            top, top_ids = torch.topk(rows_logits, k, dim=-1)
            logprobs[out_pos, 1:] = top - lse
            ids[out_pos, 1:] = top_ids
    if report is not None:
        report["nonfinite_rows"] = nonfinite
    return LogprobsTensors(ids.to(torch.int32), logprobs, ranks)


# --- when atlas-rl draws the bonus token itself --------------------------------------

def constraints_are_identity(sm) -> bool:
    """Every request random at temperature 1, no top-k or top-p: vLLM's temperature
    division and top-k/top-p leave the logits as they are (division by 1.0 is exact), so
    they can be skipped."""
    temperature = sm.temperature
    return (sm.all_random and sm.top_k is None and sm.top_p is None and temperature is not None
            and bool((temperature == 1.0).all()))


def draws_bonus_itself(sm, logits) -> bool:
    """Whether atlas-rl's rejection step draws the bonus tokens (from softmax of the rows
    vLLM's sampler would process: `AtlasRejectionSampler._processed_bonus_logits`): every
    request random, no top-k or top-p (vLLM's top-k/top-p sampler does more than
    renormalise), no logprobs of chosen token ids, on the CPU (on CUDA vLLM's sampler is
    one kernel)."""
    return (logits is not None and logits.device.type == "cpu" and sm.all_random
            and sm.top_k is None and sm.top_p is None
            and not getattr(sm, "logprob_token_ids", None))


# --- the plain path's guard and self-check ------------------------------------------

def plain_sampling_applies(sampler, metadata, draft_probs, logits, sm) -> bool:
    """A step vLLM would sample exactly like a step without speculation: no draft token
    anywhere, one logits row per request, in request order, and nothing that treats a
    bonus token differently from a plain one."""
    if metadata.max_spec_len != 0 or draft_probs is not None:
        return False
    if getattr(sampler, "synthetic_mode", False):
        return False
    num_reqs = len(metadata.num_draft_tokens)
    if logits is None or logits.shape[0] != num_reqs:
        return False
    if metadata.bonus_logits_indices.tolist() != list(range(num_reqs)):
        return False  # e.g. the dummy metadata of a warmup run
    if getattr(sm, "logprob_token_ids", None):
        return False
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return False  # applies its forcing differently to bonus tokens
    # Penalties and bad words read spec tokens: with any left, the bonus sampler differs.
    return not ((sm.bad_words_token_ids or not sm.no_penalties) and any(sm.spec_token_ids or ()))


def synthetic_batch(vocab_size: int, all_random: bool):
    """(metadata, logits, make_sampling_metadata) of a 4-request batch without drafts:
    rows 1 and 3 seeded, 0 and 2 not; one greedy row unless `all_random`."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    n = 4
    temperature = [1.0, 0.8, 0.7, 1.3] if all_random else [1.0, 0.0, 0.7, 1.3]

    def ints(*values):
        return torch.tensor(values, dtype=torch.int32)

    metadata = SpecDecodeMetadata(
        draft_token_ids=ints(), num_draft_tokens=[0] * n, cu_num_draft_tokens=ints(0, 0, 0, 0),
        cu_num_sampled_tokens=ints(1, 2, 3, 4), target_logits_indices=ints(),
        bonus_logits_indices=ints(0, 1, 2, 3), logits_indices=ints(0, 1, 2, 3))

    def sampling_metadata():  # fresh generators each time
        return SamplingMetadata(
            temperature=torch.tensor(temperature), all_greedy=False, all_random=all_random,
            top_p=None, top_k=None,
            generators={1: torch.Generator().manual_seed(11), 3: torch.Generator().manual_seed(13)},
            max_num_logprobs=1, no_penalties=True, prompt_token_ids=None,
            frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
            repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
            allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
            spec_token_ids=[[] for _ in range(n)])

    logits = torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    return metadata, logits, sampling_metadata


def plain_matches_rejection(sampler, vocab_size: int) -> str | None:
    """Sample synthetic batches without drafts with the plain sampler and with the
    rejection sampler's path for such steps (`AtlasRejectionSampler._sample`: the bonus
    sampler, the logprobs of its tokens, no rejection step); None if they agree, else
    what differs. The global RNG is left as it was."""
    saved = torch.get_rng_state()
    try:
        for all_random in (False, True):
            metadata, logits, make_sm = synthetic_batch(vocab_size, all_random)
            outs = []
            for plain in (False, True):
                sm = make_sm()
                torch.manual_seed(1234)
                if plain:
                    out = sampler.sampler(logits=logits.clone(), sampling_metadata=sm)
                else:
                    out = sampler._sample(metadata, None, logits.clone(), sm)
                outs.append((out, torch.get_rng_state(),
                             [g.get_state() for _, g in sorted(sm.generators.items())]))
            problem = _difference(*outs, vocab_size)
            if problem:
                return problem
        return None
    finally:
        torch.set_rng_state(saved)


def logprob_tolerance(vocab_size: int) -> float:
    """How far two float32 log-softmaxes of one row may differ when they sum the row in
    different orders: the rounding of a sum grows with its length (measured on this
    check's batches: 3.4e-6 at 49,152 tokens, 1.4e-5 at 151,936, 2.4e-5 at 262,144);
    1e-5 per 32,768 tokens, at least 1e-5, leaves a margin of 3x or more."""
    return 1e-5 * max(1.0, vocab_size / 32768)


def _difference(first, second, vocab_size: int = 0) -> str | None:
    (a, rng_a, gen_a), (b, rng_b, gen_b) = first, second
    if not torch.equal(a.sampled_token_ids, b.sampled_token_ids):
        return "sampled tokens differ"
    if not torch.equal(rng_a, rng_b) or not all(map(torch.equal, gen_a, gen_b)):
        return "random numbers drawn differ"
    la, lb = a.logprobs_tensors, b.logprobs_tensors
    if (la is None) != (lb is None):
        return "logprobs returned by one path only"
    if la is not None and not (
            torch.equal(la.logprob_token_ids, lb.logprob_token_ids)
            and torch.equal(la.selected_token_ranks, lb.selected_token_ranks)
            and torch.allclose(la.logprobs, lb.logprobs, rtol=0.0,
                               atol=logprob_tolerance(vocab_size))):
        return (f"logprobs differ by up to {float((la.logprobs - lb.logprobs).abs().max()):.2g}"
                f" (tolerance {logprob_tolerance(vocab_size):.2g} at {vocab_size} tokens)")
    return None
