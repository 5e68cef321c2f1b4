"""AtlasProposer: the class vLLM instantiates for ``speculative_config={"method":
"custom_class", "model": "atlas_rl.backends.vllm.proposer.AtlasProposer"}``.

It owns no policy logic: the controller decides, the speculators draft. vLLM's
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, ...)`` names requests
only by their row in the batch, so the runner's ``propose_draft_token_ids`` is wrapped
on atlas engines (hook ``atlas_proposer_step``, `attach_step_hook`) to hand the proposer
a `StepContext` first: request ids, draft tokens verified per request, finished requests,
the step's scheduled tokens and the policy's hidden states at the sampled positions.

One engine step, in named steps (docs/architecture.md, "One engine step"):

1. `begin_step`: the last step's wall time goes to the controller's cost model (pure
   decode steps only), finished requests are forgotten;
2. `_record_acceptance`: a request that had a k-token draft verified and now shows m
   sampled tokens had m - 1 of them accepted (rejection sampling keeps the accepted
   prefix and adds one token, the bonus or the correction): counters, the controller's
   calibration and the drafting speculator hear of it; a request seen for the first
   time is announced to every speculator with its prompt (`Speculator.begin_request`,
   from the input batch's ``num_prompt_tokens``);
3. `_capture_hidden_states`: the policy's hidden states at the sampled positions go to
   the speculators that read them (one copy per step: vLLM reuses the buffer);
4. the controller's `plan_step`: which speculators, how far, which draft kind;
5. `_draft`: the speculators draft; the controller's `choose_drafts` picks per request
   and cuts across the batch;
6. `_hand_over`: one token list per request (lengths may differ, empty = no draft) goes
   back to vLLM, and the distribution drafts' q is kept for the runner's draft
   probabilities (`hand_over_q` after the runner's call).

Nothing escapes into vLLM: a failing speculator means no drafts for that step, logged
once and counted in ``speculator_errors``.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch

from atlas_rl.backends.vllm import hooks
from atlas_rl.controller import AtlasController, StepPlan
from atlas_rl.kernels.rejection import pack_sparse_q
from atlas_rl.kernels.staging import staged_on
from atlas_rl.metrics import SpecCounters
from atlas_rl.speculators.base import (
    EMPTY_DRAFT,
    Draft,
    HiddenStateSpeculator,
    Speculator,
    drafter_reads_policy,
)

logger = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What the runner tells the proposer about one engine step."""

    req_ids: list[str]
    num_verified: list[int] | None   # draft tokens verified per request (None: no spec step)
    finished: tuple[str, ...] = ()
    num_scheduled_tokens: int | None = None
    hidden: torch.Tensor | None = None  # policy hidden states at the sampled positions
    aux: torch.Tensor | None = None     # its features at the EAGLE-3 layers there (concatenated)
    num_prompt_tokens: list[int] | None = None  # prompt length per request (None: unknown)


@dataclass
class DeviceDrafts:
    """A device-path step's drafts (`AtlasProposer._draft_on_device`): their tokens and
    confidences on their way to pinned host memory, read by the next step."""

    keys: list[str]
    host: torch.Tensor                 # [2, reqs, k] float64: ids, then confidences
    event: torch.cuda.Event | None     # recorded after the copy (CUDA); None: done
    source: str                        # the speculator
    sample: list[bool]                 # per request: drawn from q (else its argmax)
    qs: torch.Tensor                   # [reqs, k, S] q on the device
    support: torch.Tensor              # [S] token ids of q's columns


@dataclass
class LiveRequests:
    """The requests of a step that sampled a token (and so may get a draft)."""

    rows: list[int] = field(default_factory=list)      # row in vLLM's batch
    keys: list[str] = field(default_factory=list)      # request id
    contexts: list = field(default_factory=list)       # token ids so far (prompt + output)
    sampled: list[list[int]] = field(default_factory=list)


def install_atlas(runner, proposer: "AtlasProposer", verifier: str) -> None:
    """Make `runner` (an atlas engine's model runner) speculate with atlas-rl: its
    rejection sampler becomes `AtlasRejectionSampler` (atlas-rl verifies where
    ``verifier == "atlas"``), and each drafting step hands `proposer` its context."""
    from atlas_rl.backends.vllm import sampler

    sampler.attach(runner, atlas_verifies=verifier == "atlas")
    attach_step_hook(runner, proposer)
    layers = proposer.aux_layers()
    if layers:
        enable_aux_hidden_states(runner, layers)


def enable_aux_hidden_states(runner, layers) -> bool:
    """Have the policy return its residual stream at `layers` (vLLM's numbering: the
    input of that layer) beside its last hidden state, as vLLM does for its own EAGLE-3
    drafters; the step hook hands them to the proposer at the sampled positions."""
    from vllm.model_executor.models.interfaces import supports_eagle3

    model = runner.get_model()
    if not hasattr(runner, "use_aux_hidden_state_outputs") or not supports_eagle3(model):
        hooks.record("aux_hidden_states", "not applied: this model or vLLM has no EAGLE-3 "
                     "feature path; the EAGLE-3 drafter drafts nothing")
        return False
    model.set_aux_hidden_state_layers(tuple(int(x) for x in layers))  # vLLM's own API
    hooks.assign(runner, {"use_aux_hidden_state_outputs": True}, key="aux_hidden_states")
    hooks.record("aux_hidden_states", f"applied (layers {tuple(layers)})")
    return True


def attach_step_hook(runner, proposer: "AtlasProposer") -> None:
    """Wrap this runner's ``propose_draft_token_ids`` so that `proposer` gets each step's
    context before vLLM asks it for drafts, and the runner gets the drafts' q after."""
    from atlas_rl.backends.vllm import sampler

    original = runner.propose_draft_token_ids  # bound: this runner's, vLLM's class method
    signature = inspect.signature(original)

    def propose_draft_token_ids(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        metadata = bound.get("spec_decode_metadata")
        scheduler_output = bound.get("scheduler_output")
        proposer.begin_step(StepContext(
            req_ids=list(runner.input_batch.req_ids),
            num_verified=None if metadata is None else list(metadata.num_draft_tokens),
            finished=proposer.take_finished(getattr(scheduler_output, "finished_req_ids", ())),
            num_scheduled_tokens=getattr(scheduler_output, "total_num_scheduled_tokens", None),
            hidden=bound.get("sample_hidden_states"),
            aux=sampled_aux(runner, bound),
            num_prompt_tokens=prompt_lengths(runner.input_batch)))
        out = original(*args, **kwargs)
        try:
            hand_over_q(runner, proposer, packed=sampler.verifies(runner))
        except Exception as e:  # noqa: BLE001 (without q, drafts are verified one-hot: exact)
            hooks.assign(runner, {"_draft_probs": None, "_draft_prob_req_ids": None},
                         key="draft_probs")
            proposer.speculator_failed(None, e)
        return out

    hooks.patch(runner, "propose_draft_token_ids", propose_draft_token_ids,
                key="atlas_proposer_step")
    hooks.record("atlas_proposer_step", "applied")
    # A step with nothing scheduled (vLLM's flush of the last finished requests, when the
    # engine has no other work) updates the runner's states and returns before proposing:
    # its finished requests are noted here, and the next step's context carries them.
    original_update = getattr(runner, "_update_states", None)
    if original_update is None:
        return  # each step's own finished requests still arrive with its context

    def _update_states(scheduler_output, *args, **kwargs):
        proposer.note_finished(getattr(scheduler_output, "finished_req_ids", ()))
        return original_update(scheduler_output, *args, **kwargs)

    hooks.patch(runner, "_update_states", _update_states, key="atlas_proposer_step")


def sampled_aux(runner, bound) -> torch.Tensor | None:
    """The policy's features at the EAGLE-3 layers (hook ``aux_hidden_states``) at the
    positions it sampled from, rows as in ``sample_hidden_states``: vLLM samples at its
    ``logits_indices`` (the spec-decode metadata's, else each request's last scheduled
    token)."""
    aux = bound.get("aux_hidden_states")
    hidden = bound.get("sample_hidden_states")
    if not aux or hidden is None:
        return None
    metadata = bound.get("spec_decode_metadata")
    if metadata is not None:
        idx = metadata.logits_indices
    else:
        scheduled = getattr(bound.get("scheduler_output"), "num_scheduled_tokens", None) or {}
        counts = [int(scheduled.get(rid, 0)) for rid in runner.input_batch.req_ids]
        idx = torch.tensor(counts, dtype=torch.long).cumsum(0) - 1
    idx = idx.to(aux[0].device)
    if len(idx) != len(hidden):
        return None
    return torch.cat([a[idx] for a in aux], dim=-1)


def hand_over_q(runner, proposer: "AtlasProposer", packed: bool = False) -> bool:
    """Store the last proposal's draft distributions where vLLM's runner keeps those of
    its own model drafters (``_draft_probs`` with the request ids they belong to); its
    ``_get_spec_decode_draft_probs`` passes them to the rejection sampler, which then
    accepts a draft token x with min(1, p(x)/q(x)) and recovers from max(0, p - q): the
    output is exactly p, a draft accepted with probability 1 - TV(p, q). vLLM asks only
    its own drafters for q, never a ``custom_class`` one. ``packed``: atlas-rl's verifier
    takes q packed sparse (`kernels.rejection.pack_sparse_q`), vLLM's [reqs, k, vocab].
    Where this vLLM has no such path, or ``ATLAS_RL_COMPAT=off``, distribution drafts are
    verified one-hot (still exact, accepted less). True if handed."""
    probs = proposer.take_last_packed_q() if packed else proposer.take_last_draft_probs()
    if probs is None:
        return False
    supported = (hooks.enabled() and hasattr(runner, "_draft_probs")
                 and hasattr(runner, "_draft_prob_req_ids")
                 and hasattr(type(runner), "_get_spec_decode_draft_probs"))
    if not supported:
        if "draft_probs" not in hooks.status():
            hooks.record("draft_probs", "not applied (this vLLM has no draft-probability "
                         "path, or compat is off): distribution drafts are verified one-hot")
            logger.info("atlas-rl: %s", hooks.status()["draft_probs"])
        return False
    hooks.record("draft_probs", "applied")
    hooks.assign(runner, {"_draft_probs": probs,
                          "_draft_prob_req_ids": list(runner.input_batch.req_ids)},
                 key="draft_probs")
    return True


class AtlasProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.speculators: dict[str, Speculator] = {}
        self.controller: AtlasController | None = None
        self.target_model = None
        self.counters = SpecCounters()
        self._versions: dict[str, int] = {}  # speculator -> the weights' version last seen
        self._pending: dict[str, Draft] = {}  # req_id -> Draft handed to vLLM last step
        self._started: set[str] = set()  # req_ids announced with `begin_request`
        self._context: StepContext | None = None
        self._step_end: float | None = None
        # the last step's distribution drafts, for the q hand-over: (num_reqs, [(row,
        # Draft)]) on the host path, (num_reqs, DeviceDrafts, ids) on the device path
        self._handed: tuple | None = None
        # Draft on the device and hand vLLM a device tensor (`_draft_on_device`): None =
        # where the policy's hidden states are on an accelerator; True/False to force it
        # (True outside an accelerator is for the harness and tests: vLLM's CPU runner
        # copies a tensor of drafts through CUDA streams it does not have).
        self.device_drafts: bool | None = None
        self._device_drafts: DeviceDrafts | None = None  # the last device-path step's
        self._error_logged = False
        self.weight_syncs = 0  # policy weight updates seen (a server's weight transfer)
        self._asleep: dict[str, tuple] = {}  # drafter states kept over a level-2 sleep
        self._finished_noted: list[str] = []  # finished at steps that did not propose
        self.vllm_config = vllm_config
        # set up in a worker that stock vLLM started (`worker.setup_in_worker`): learning
        # there needs the sequences the engine completed
        self.worker = None
        self.completed: list[list[int]] = []
        self._sequences: dict[str, list[int]] | None = None

    def track_completed(self) -> None:
        """Collect each request's prompt + sampled tokens; finished ones go to
        `completed` (what a worker learns from, `take_completed`)."""
        self._sequences = {}

    def take_completed(self) -> list[list[int]]:
        out, self.completed = self.completed, []
        return out

    def end_batch(self) -> None:
        """Every request has returned (vLLM reports the last ones finished only at its
        next step): their sequences are completed and their per-request state goes."""
        for rid in list(self._sequences or ()):
            seq = self._sequences.pop(rid)
            if seq:
                self.completed.append(seq)
        for spec in self.speculators.values():
            spec.begin_batch()
        self.begin_batch()
        self._pending.clear()

    def finish_noted(self) -> None:
        """Finish now the requests vLLM reported finished in steps that did not propose
        (its flush of the last ones, when the engine had no other work; otherwise the
        next step's context carries them): their sequences completed, their
        per-request state released. An idle worker learns them without waiting for the
        next request."""
        for rid in self.take_finished():
            self._finish(rid)

    def noted_sequences(self) -> int:
        """Sequences of requests reported finished that `finish_noted` would complete."""
        return sum(1 for rid in self._finished_noted if rid in (self._sequences or ()))

    def _finish(self, rid) -> None:
        self._pending.pop(rid, None)
        self._started.discard(rid)
        if self._sequences is not None:
            seq = self._sequences.pop(rid, None)
            if seq:
                self.completed.append(seq)
        for spec in self.speculators.values():
            try:
                spec.finish(rid)
            except Exception as e:  # noqa: BLE001 (never into vLLM)
                self.speculator_failed(spec, e)

    def attach(self, speculators: dict[str, Speculator] | Speculator,
               controller: AtlasController) -> None:
        """Called by the engine once vLLM built us: until then we draft nothing."""
        if controller.max_lookahead > self.num_speculative_tokens:
            raise ValueError(
                f"controller max_lookahead {controller.max_lookahead} exceeds vLLM's "
                f"num_speculative_tokens {self.num_speculative_tokens}")
        if isinstance(speculators, Speculator):
            speculators = {speculators.name: speculators}
        self.speculators = dict(speculators)
        self.controller = controller
        for spec in self._readers():
            if self.target_model is not None:
                spec.attach_target(*target_embeddings(self.target_model))

    def note_finished(self, req_ids) -> None:
        """Requests vLLM reported finished (at any step, proposing or not)."""
        if req_ids:
            self._finished_noted.extend(req_ids)

    def take_finished(self, req_ids=()) -> tuple[str, ...]:
        """The finished requests noted since the last step, and `req_ids`, once each."""
        out = tuple(dict.fromkeys([*self._finished_noted, *(req_ids or ())]))
        self._finished_noted.clear()
        return out

    def policy_weights_changed(self, target_model=None) -> None:
        """New policy weights were loaded (a server's weight transfer): the drafters
        re-read the policy's embedding and LM head (a reload may have replaced the tensors,
        not only their values) and drop what they derived from them."""
        if target_model is not None:
            self.target_model = target_model
        self.weight_syncs += 1
        self._reread_policy()

    def _reread_policy(self) -> None:
        for spec in self._readers():
            if self.target_model is not None:
                spec.attach_target(*target_embeddings(self.target_model))
            spec.weights_synced()

    def before_sleep(self, level: int) -> None:
        """vLLM is going to sleep (hook ``sleep_mode``). Level 2 discards the device memory
        allocated while the model loaded, the drafters' weights included: their state goes
        to the host first (`state()` copies to the CPU). Level 1 keeps a host copy of that
        memory itself, so there is nothing to do. The idle learner (a server's) waits
        until the weights are back."""
        idle = getattr(self.worker, "idle", None)
        if idle is not None:
            idle.hold(True)
        if level >= 2:
            self._asleep = {name: spec.state() for name, spec in self.speculators.items()
                            if isinstance(spec, HiddenStateSpeculator)}

    def after_wake(self, tags) -> None:
        """vLLM woke up (``tags``: what it re-allocated; None: everything): once the
        weights are back, the drafters get their state again and re-read the policy's
        embedding and head (whose values a sync restores after a level-2 sleep: TRL
        syncs before generating, and the drafters re-read them again then)."""
        if tags is not None and "weights" not in tags:
            return
        saved, self._asleep = self._asleep, {}
        for name, (tensors, meta) in saved.items():
            self.speculators[name].load_state(tensors, meta)
        self._reread_policy()
        idle = getattr(self.worker, "idle", None)
        if idle is not None:
            idle.hold(False)

    def drafter_reads_policy(self) -> bool | None:
        """Whether every drafter reads the served policy's current embedding and LM head
        (`speculators.base.drafter_reads_policy`); None without a drafter that reads them."""
        if self.target_model is None:
            return None
        return drafter_reads_policy(self._readers(), *target_embeddings(self.target_model))

    def load_model(self, target_model) -> None:
        """vLLM hands us the target model: the neural drafter shares its embedding and
        LM head (references, so weight syncs reach it)."""
        self.target_model = target_model

    def begin_batch(self) -> None:
        self._step_end = None
        self._started.clear()  # no request runs between generate calls

    def aux_layers(self) -> tuple[int, ...]:
        """The policy layers whose features a speculator reads (EAGLE-3), if any."""
        for spec in self._readers():
            if getattr(spec, "uses_aux_hidden_states", False) and spec.aux_layers:
                return tuple(spec.aux_layers)
        return ()

    def _readers(self) -> list[HiddenStateSpeculator]:
        return [s for s in self.speculators.values() if isinstance(s, HiddenStateSpeculator)]

    # --- 1. the step begins ----------------------------------------------------------

    def begin_step(self, ctx: StepContext) -> None:
        now = time.perf_counter()
        self._context = ctx
        if self.controller is not None and self._step_end is not None and ctx.num_scheduled_tokens:
            drafted = sum(ctx.num_verified) if ctx.num_verified is not None else 0
            # Only pure decode steps (no prompt chunk in them) say what decoding costs.
            if ctx.num_scheduled_tokens == len(ctx.req_ids) + drafted:
                self.controller.record_step_time(len(ctx.req_ids), drafted, now - self._step_end)
        for rid in ctx.finished:
            self._finish(rid)
        if self.worker is not None:
            try:
                self.worker.on_step(len(ctx.req_ids))
            except Exception as e:  # noqa: BLE001 (a failed update never stops generation)
                self.speculator_failed(None, e)

    # --- vLLM's entry point ----------------------------------------------------------

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **_ignored) -> list[list[int]]:
        num_reqs = len(sampled_token_ids)
        ctx, self._context = self._context, None
        self._handed = None
        start = time.perf_counter()
        try:
            if not self.speculators or ctx is None or len(ctx.req_ids) != num_reqs:
                return [[] for _ in range(num_reqs)]
            self._take_device_drafts()
            live = self._record_acceptance(ctx, sampled_token_ids, num_tokens_no_spec,
                                           token_ids_cpu)
            self._capture_hidden_states(ctx, live, num_tokens_no_spec)
            self._note_new_weights()
            plan = self.controller.plan_step(len(live.keys))
            self.counters.record_batch(len(live.keys), plan.lookahead > 0, plan.closed,
                                       plan.probe)
            if self._device_path(ctx):
                handed = self._draft_on_device(plan, live, num_reqs)
                if handed is not None:
                    return handed
            drafts = self._draft(plan, live)
            return self._hand_over(num_reqs, live, drafts)
        except Exception as e:  # noqa: BLE001 (a failing speculator must not kill a rollout)
            self.speculator_failed(None, e)
            self._pending.clear()
            self._handed = None
            self._device_drafts = None
            return [[] for _ in range(num_reqs)]
        finally:
            end = time.perf_counter()
            self.counters.propose_seconds += end - start
            self._step_end = end

    # --- 2. acceptance of last step's drafts -----------------------------------------

    def _record_acceptance(self, ctx: StepContext, sampled_token_ids, num_tokens_no_spec,
                           token_ids_cpu) -> LiveRequests:
        live = LiveRequests()
        for row, rid in enumerate(ctx.req_ids):
            sampled = sampled_token_ids[row]
            draft = self._pending.pop(rid, EMPTY_DRAFT)
            if not sampled:  # a partial prefill chunk or a discarded request: no draft
                continue
            verified = len(draft) if ctx.num_verified is None else min(ctx.num_verified[row], len(draft))
            if verified:
                accepted = min(len(sampled) - 1, verified)
                verified_draft = draft.truncate(verified)
                self.counters.record_verified(verified, accepted, draft.arm.label,
                                              history=draft.from_history)
                self.controller.record_acceptance(verified_draft, accepted)
                spec = self.speculators.get(draft.source)
                if spec is not None:
                    spec.feedback(rid, verified_draft, accepted)
            context = token_ids_cpu[row, :int(num_tokens_no_spec[row])]
            if rid not in self._started and ctx.num_prompt_tokens is not None:
                self._begin_request(rid, context, ctx.num_prompt_tokens[row])
            if self._sequences is not None and rid in self._sequences:
                self._sequences[rid].extend(int(t) for t in sampled)
            live.rows.append(row)
            live.keys.append(rid)
            live.contexts.append(context)
            live.sampled.append(sampled)
        return live

    def _begin_request(self, rid: str, context, prompt_len: int) -> None:
        self._started.add(rid)
        if not 0 < prompt_len <= len(context):
            return
        prompt = context[:prompt_len]
        prompt = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)  # vLLM reuses it
        if self._sequences is not None:
            self._sequences[rid] = list(prompt)
        for spec in self.speculators.values():
            try:
                spec.begin_request(rid, prompt)
            except Exception as e:  # noqa: BLE001 (never into vLLM)
                self.speculator_failed(spec, e)

    # --- 3. hidden states for the speculators that read them -------------------------

    def _capture_hidden_states(self, ctx: StepContext, live: LiveRequests,
                               num_tokens_no_spec) -> None:
        readers = self._readers()
        offsets = sampled_offsets(ctx) if readers else None
        if offsets is None:
            return
        # vLLM reuses the buffer: one copy per step, where it is (on a GPU it stays there:
        # a copy to the host would wait for the step's forward)
        where = ctx.hidden.device if self._device_path(ctx) else "cpu"
        hidden = ctx.hidden.detach().to(where, torch.float32, copy=True)
        aux = None if ctx.aux is None else ctx.aux.detach().to(where, torch.float32, copy=True)
        first = [int(num_tokens_no_spec[row]) - len(sampled) - 1
                 for row, sampled in zip(live.rows, live.sampled)]
        starts = [int(offsets[row]) for row in live.rows]
        for spec in readers:
            spec.capture_batch(live.keys, hidden, live.sampled, first, starts,
                               aux=aux if getattr(spec, "uses_aux_hidden_states", False) else None)

    def _note_new_weights(self) -> None:
        """Tell the controller of a speculator that published new weights since the last
        step (its ``version`` moved): it looks afresh at the batch sizes where drafting
        had stopped paying (`AtlasController.speculator_changed`)."""
        for name, spec in self.speculators.items():
            version = getattr(spec, "version", None)
            if version is None:
                continue
            if self._versions.get(name, version) != version:
                self.controller.speculator_changed(name)
            self._versions[name] = version

    # --- 5. drafting -----------------------------------------------------------------

    def _draft(self, plan: StepPlan, live: LiveRequests) -> list[Draft]:
        if plan.lookahead == 0 or not live.keys:
            return [EMPTY_DRAFT] * len(live.keys)
        # Never draft past the model length: the verifier needs room for k + 1.
        max_lens = [max(0, min(plan.lookahead, self.max_model_len - len(c) - 1))
                    for c in live.contexts]
        start = time.perf_counter()
        candidates: list[list[Draft]] = [[] for _ in live.keys]
        for name in plan.speculators:
            spec = self.speculators[name]
            k = plan.lookaheads.get(name, plan.lookahead)
            t0 = time.perf_counter()
            lengths = [min(m, k) for m in max_lens]
            try:
                if name in plan.both:  # one-hot and distribution, from one lookup
                    drafts = [d for pair in spec.propose_both(live.keys, live.contexts, lengths)
                              for d in pair]
                    owners = [i for i in range(len(live.keys)) for _ in range(2)]
                else:
                    drafts = spec.propose(live.keys, live.contexts, lengths,
                                          sample=plan.sample[name])
                    owners = range(len(live.keys))
            except Exception as e:  # noqa: BLE001 (one speculator failing leaves the others)
                self.speculator_failed(spec, e)
                continue
            self.controller.record_draft_time(name, time.perf_counter() - t0, max(lengths))
            for i, d in zip(owners, drafts):
                if d.tokens:
                    d.source = d.source or name
                    candidates[i].append(d)
        drafts = self.controller.choose_drafts(plan, candidates)
        drafts = [d.truncate(min(self.num_speculative_tokens, m)) for d, m in zip(drafts, max_lens)]
        self.counters.draft_seconds += time.perf_counter() - start
        return drafts

    # --- 5'. drafting on the device (a GPU) ----------------------------------------------

    def _device_path(self, ctx: StepContext | None) -> bool:
        """Whether this step drafts on the device: ``device_drafts`` True, or None (the
        default) with the policy's hidden states on an accelerator."""
        if self.device_drafts is not None:
            return bool(self.device_drafts)
        return ctx is not None and ctx.hidden is not None and ctx.hidden.device.type != "cpu"

    def _draft_on_device(self, plan: StepPlan, live: LiveRequests, num_reqs: int):
        """Draft for every request of the step on the device and hand vLLM the draft
        tokens as a [num_reqs, k] device tensor (its runner copies it to the host without
        waiting, as for its own EAGLE drafters): nothing in this step reads the device.
        The tokens and confidences go to pinned host memory in one non-blocking copy that
        the next step reads (`_take_device_drafts`: by then the forward that verified
        them has run), for acceptance counts, the controller's calibration and feedback.

        Taken when the plan drafts with one speculator that drafts on the device
        (`NeuralSpeculator.draft_rows`), every request of the batch sampled a token and
        has room for k more; otherwise (None) the step drafts on the host path. Every
        request gets the step's lookahead k: the per-request goodput cut needs the
        confidences on the host, which is the wait this path avoids; the controller still
        sets k and the speculator per step from what it measured."""
        if plan.lookahead == 0 or len(plan.speculators) != 1 or len(live.keys) != num_reqs:
            return None
        name = plan.speculators[0]
        spec = self.speculators[name]
        if not hasattr(spec, "draft_rows"):
            return None
        k = min(plan.lookaheads.get(name, plan.lookahead), self.num_speculative_tokens)
        if k <= 0 or any(len(c) + k + 1 > self.max_model_len for c in live.contexts):
            return None
        sample = [bool(x) for x in plan.sample.get(name, [False] * num_reqs)]
        start = time.perf_counter()
        try:
            drafted = spec.draft_rows(live.keys, k, sample)
        except Exception as e:  # noqa: BLE001 (no drafts this step; the host path is exact)
            self.speculator_failed(spec, e)
            return None
        if drafted is None:
            return None
        ids = drafted.ids
        host = torch.empty((2, num_reqs, k), dtype=torch.float64, pin_memory=ids.is_cuda)
        host.copy_(drafted.packed, non_blocking=True)  # ids and confidences (exact in float64)
        event = None
        if ids.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._device_drafts = DeviceDrafts(list(live.keys), host, event, name, sample,
                                           drafted.qs, drafted.support)
        if any(sample):
            self._handed = (num_reqs, self._device_drafts, ids)
        seconds = time.perf_counter() - start
        self.controller.record_draft_time(name, seconds, k)
        self.counters.draft_seconds += seconds
        self.counters.request_steps += num_reqs
        for _ in range(num_reqs):
            self.counters.record_lookahead(k)
        return ids

    def _take_device_drafts(self) -> None:
        """The last step's device drafts become `Draft`s of the requests they were handed
        to (their host copy is complete by now: the step that verified them ran after it)."""
        last, self._device_drafts = self._device_drafts, None
        if last is None:
            return
        if last.event is not None:
            last.event.synchronize()
        toks, confs = last.host[0].long().tolist(), last.host[1].tolist()
        for j, key in enumerate(last.keys):
            dist = last.sample[j]
            self._pending[key] = Draft(
                toks[j], confs[j], source=last.source,
                q_ids=last.support.expand(len(toks[j]), -1) if dist else None,
                q=last.qs[j] if dist else None)

    # --- 6. hand-over ----------------------------------------------------------------

    def _hand_over(self, num_reqs: int, live: LiveRequests, drafts: list[Draft]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(num_reqs)]
        handed = []
        for row, rid, draft in zip(live.rows, live.keys, drafts):
            self.counters.request_steps += 1
            self.counters.record_lookahead(len(draft))
            if not draft.tokens:
                continue
            self._pending[rid] = draft
            out[row] = list(draft.tokens)
            handed.append((row, draft))
        if any(d.is_distribution for _, d in handed):
            self._handed = (num_reqs, handed)
        return out

    def _take_sparse_q(self):
        """The last proposal's draft distributions as (ids, q), both [num_reqs, k, S]
        (S the widest support; padding has probability 0), or None when every draft was
        one-hot. One-hot drafts in the same step get q = 1 on their token (verification
        is then the same as without q)."""
        last, self._handed = self._handed, None
        if last is None:
            return None
        num_reqs, handed = last[:2]
        if isinstance(handed, DeviceDrafts):  # the device path: every request, k tokens
            return self._device_sparse_q(last[2], handed.qs, handed.sample, handed.support)
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

    @staticmethod
    def _device_sparse_q(ids: torch.Tensor, qs: torch.Tensor, sample: list[bool],
                         vocab: torch.Tensor):
        """(ids, q) [num_reqs, k, S] of a device-path step, where its tokens are: a sampled
        row's q on the draft vocabulary; an argmax row's q is one-hot on its token (its
        token was not drawn from q: verified as one-hot, exact)."""
        num_reqs, k, width = qs.shape
        support = vocab.view(1, 1, -1).expand(num_reqs, k, width)
        if all(sample):
            return support, qs
        flag = staged_on(tuple(sample), torch.bool, qs.device).view(-1, 1, 1)
        onehot_ids = torch.zeros_like(support).copy_(ids.unsqueeze(-1))  # x everywhere
        onehot_q = torch.zeros_like(qs)
        onehot_q[..., 0] = 1.0  # q = 1 on x (the repeats of x have q = 0)
        return torch.where(flag, support, onehot_ids), torch.where(flag, qs, onehot_q)

    def take_last_draft_probs(self):
        """[num_reqs, k, vocab] draft distributions of the last proposal, or None when
        every draft was one-hot."""
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

    def speculator_failed(self, spec, error: Exception) -> None:
        self.counters.speculator_errors += 1
        if not self._error_logged:
            self._error_logged = True
            logger.warning("atlas-rl: speculator %s failed (%s: %s); drafting nothing from it "
                           "for this step. Later failures are counted, not logged.",
                           getattr(spec, "name", "?"), type(error).__name__, error)


def prompt_lengths(input_batch) -> list[int] | None:
    """Prompt length of each request of vLLM's input batch, by row (None where this
    vLLM's batch does not say)."""
    lengths = getattr(input_batch, "num_prompt_tokens", None)
    if lengths is None:
        return None
    return [int(n) for n in lengths[:len(input_batch.req_ids)]]


def sampled_offsets(ctx: StepContext) -> list[int] | None:
    """Row of each request's first sampled position in the step's hidden states (vLLM
    samples at k + 1 positions of a request with a k-token draft), or None when there
    are none or their layout is not that one (drafting then uses tokens only)."""
    if ctx.hidden is None:
        return None
    num_reqs = len(ctx.req_ids)
    sizes = [1] * num_reqs if ctx.num_verified is None else [k + 1 for k in ctx.num_verified]
    if sum(sizes) != ctx.hidden.shape[0]:
        return None
    offsets, total = [], 0
    for s in sizes:
        offsets.append(total)
        total += s
    return offsets


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
