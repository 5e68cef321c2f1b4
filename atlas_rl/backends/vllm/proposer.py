"""AtlasProposer: the class vLLM instantiates for ``speculative_config={"method":
"custom_class", "model": "atlas_rl.backends.vllm.proposer.AtlasProposer"}``.

It owns no policy logic. Each decode step, inside the worker, it
1. reads acceptance feedback: a request that had a k-token draft verified and now
   shows m sampled tokens had m - 1 of them accepted (rejection sampling keeps the
   accepted prefix and adds one token, the bonus or the correction); the controller
   calibrates its confidence from it and the speculator may learn from it;
2. asks the controller for the step's lookahead (live batch size) and the speculator
   for drafts, then lets the controller cut each draft by its confidence;
3. returns one token list per request (lengths may differ, empty = no draft).
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

from atlas_rl.metrics import SpecCounters
from atlas_rl.speculators.base import EMPTY_DRAFT

logger = logging.getLogger(__name__)

# Proposers built in this process (in-process engines), newest last.
_PROPOSERS: "weakref.WeakSet[AtlasProposer]" = weakref.WeakSet()


def _install_runner_hook() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.propose_draft_token_ids
    if getattr(original, "_atlas_hook", False):
        return
    signature = inspect.signature(original)

    def propose_draft_token_ids(self, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, AtlasProposer):
            bound = signature.bind(self, *args, **kwargs).arguments
            metadata = bound.get("spec_decode_metadata")
            scheduler_output = bound.get("scheduler_output")
            drafter.begin_step(
                req_ids=list(self.input_batch.req_ids),
                num_verified=None if metadata is None else list(metadata.num_draft_tokens),
                finished=getattr(scheduler_output, "finished_req_ids", ()),
            )
        return original(self, *args, **kwargs)

    propose_draft_token_ids._atlas_hook = True
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids


class AtlasProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.speculator = None
        self.controller = None
        self.counters = SpecCounters()
        self._pending: dict[str, object] = {}  # req_id -> Draft handed to vLLM last step
        self._step = None
        self._error_logged = False
        _install_runner_hook()
        _PROPOSERS.add(self)

    def attach(self, speculator, controller) -> None:
        """Called by the engine once vLLM built us: until then we draft nothing."""
        if controller.max_lookahead > self.num_speculative_tokens:
            raise ValueError(
                f"controller max_lookahead {controller.max_lookahead} exceeds vLLM's "
                f"num_speculative_tokens {self.num_speculative_tokens}")
        self.speculator = speculator
        self.controller = controller

    def load_model(self, target_model) -> None:
        """vLLM hands us the target model; model-free speculators need no weights."""

    def begin_step(self, req_ids, num_verified, finished) -> None:
        self._step = (req_ids, num_verified)
        for rid in finished or ():
            self._pending.pop(rid, None)
            if self.speculator is not None:
                try:
                    self.speculator.finish(rid)
                except Exception as e:  # noqa: BLE001 (never into vLLM)
                    self._speculator_failed(e)

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **_ignored) -> list[list[int]]:
        num_reqs = len(sampled_token_ids)
        empty = [[] for _ in range(num_reqs)]
        step, self._step = self._step, None
        if self.speculator is None or step is None or len(step[0]) != num_reqs:
            return empty
        start = time.perf_counter()
        try:
            return self._propose(step, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        except Exception as e:  # noqa: BLE001 (a failing speculator must not kill a rollout)
            self._speculator_failed(e)
            self._pending.clear()
            return empty
        finally:
            self.counters.propose_seconds += time.perf_counter() - start

    def _propose(self, step, sampled_token_ids, num_tokens_no_spec, token_ids_cpu):
        req_ids, num_verified = step
        counters, speculator = self.counters, self.speculator
        rows, keys, contexts, max_lens = [], [], [], []
        step_k = self.controller.step_lookahead(len(req_ids))
        for row, rid in enumerate(req_ids):
            sampled = sampled_token_ids[row]
            draft = self._pending.pop(rid, EMPTY_DRAFT)
            if not sampled:  # a partial prefill chunk or a discarded request: no draft
                continue
            verified = len(draft) if num_verified is None else min(num_verified[row], len(draft))
            if verified:
                accepted = min(len(sampled) - 1, verified)
                counters.record_verified(verified, accepted)
                verified_draft = draft.truncate(verified)
                self.controller.observe(verified_draft, accepted)
                speculator.feedback(rid, verified_draft, accepted)
            n = int(num_tokens_no_spec[row])
            rows.append(row)
            keys.append(rid)
            contexts.append(token_ids_cpu[row, :n])
            # Never draft past the model length: the verifier needs room for k + 1.
            max_lens.append(max(0, min(step_k, self.max_model_len - n - 1)))

        out = [[] for _ in req_ids]
        start = time.perf_counter()
        drafts = speculator.propose(keys, contexts, max_lens)
        drafts = [self.controller.trim(d).truncate(self.num_speculative_tokens) for d in drafts]
        counters.draft_seconds += time.perf_counter() - start
        for row, rid, draft in zip(rows, keys, drafts):
            counters.request_steps += 1
            counters.record_lookahead(len(draft))
            if draft.tokens:
                self._pending[rid] = draft
                out[row] = list(draft.tokens)
        return out

    def _speculator_failed(self, error: Exception) -> None:
        self.counters.speculator_errors += 1
        if not self._error_logged:
            self._error_logged = True
            logger.warning("atlas-rl: speculator %s failed (%s: %s); drafting nothing for "
                           "this step. Later failures are counted, not logged.",
                           getattr(self.speculator, "name", "?"), type(error).__name__, error)
