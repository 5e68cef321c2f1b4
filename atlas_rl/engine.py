"""AtlasRolloutEngine: the user's one object for rollouts inside an RL loop."""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from atlas_rl import ranks
from atlas_rl import speculation as speculation_room
from atlas_rl.config import SPECULATION_METHODS, AtlasConfig
from atlas_rl.machine import (
    generating,
    one_off_allocations,
    release_freed_memory,
    reuse_while_generating,
)
from atlas_rl.metrics import (
    SpecCounters,
    oracle_acceptance_length,
    summarize,
    summarize_arms,
    summarize_history,
    summarize_plans,
)
from atlas_rl.models import check_tokenizer, resolve_model
from atlas_rl.rollout import Completion, RolloutBatch
from atlas_rl.speculators import NeuralSpeculator
from atlas_rl.speculators.base import Speculator
from atlas_rl.speculators.eagle3 import Eagle3Speculator

logger = logging.getLogger(__name__)

Prompt = str | Sequence[Mapping[str, str]] | Sequence[int]


class NonFiniteLogitsError(RuntimeError):
    """The policy computed NaN or inf logits for tokens of this rollout: they are not
    samples of the policy, and the generate call returns none of its completions."""


def _nonfinite_position(c: Completion) -> int | None:
    """Where a completion's first token drawn from NaN or inf logits is (its logprob is
    not finite, or vLLM failed the request there: finish_reason "error"); None if nowhere."""
    position = next((j for j, lp in enumerate(c.logprobs) if not math.isfinite(lp)), None)
    if position is None and c.finish_reason == "error":
        position = max(0, len(c.completion_ids) - 1)
    return position


def _nonfinite_message(completions: list[Completion]) -> str:
    bad = [(i, j) for i, j in enumerate(map(_nonfinite_position, completions)) if j is not None]
    first, position = bad[0]
    return (f"the policy computed NaN or inf logits: {len(bad)} of {len(completions)} "
            f"completions hold tokens drawn from them (first: completion {first}, token "
            f"{position}), which are not samples of the policy, so this generate call "
            f"returns nothing. Its weights or activations diverged (e.g. a bf16 overflow "
            f"after an update: sync_weights checks the weights, not what they compute); check "
            f"the last update (learning rate, gradient clipping, loss scale) or run the engine "
            f"in float32 (AtlasConfig(dtype='float32')). The engine itself is unharmed: sync "
            f"sound weights and generate again")


def _completion_seed(seed: int, index: int) -> int:
    # Each completion gets its own seed so that the n completions of a prompt differ
    # and a call reproduces whatever else shares the batch.
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class AtlasRolloutEngine:
    """Rollouts from an in-process vLLM engine, decoded speculatively and losslessly.

    >>> engine = AtlasRolloutEngine("smollm2-135m-instruct")          # doctest: +SKIP
    >>> batch = engine.generate(["def add(a, b):"], n=4, max_tokens=64)  # doctest: +SKIP
    >>> engine.update(batch)        # the adaptive speculator learns the rollouts
    >>> engine.sync_weights(policy)  # after the policy update

    ``speculation``: "atlas" (ours: static + adaptive speculators, learning online),
    "atlas-static" (the same with online training off), "none", or vLLM's own
    "vllm-ngram" and "vllm-suffix" as peers. Extra keyword arguments go to ``vllm.LLM``.

    ``multiprocess=True``: vLLM runs its engine core (and the proposer) in its own
    process, as ``vllm serve`` does; the proposer sets itself up there through the
    atlas-rl vLLM plugin, and stats, learning, save and load reach it through
    ``collective_rpc`` (`backends.vllm.remote`); so do weight syncs, as files in a private
    ``/dev/shm`` directory with the same checks and rollback (`remote.RemoteWeightSync`).
    """

    def __init__(self, model: str, speculation: str = "atlas", config: AtlasConfig | None = None,
                 *, llm=None, multiprocess: bool = False, **vllm_engine_kwargs: Any):
        if speculation not in SPECULATION_METHODS:
            raise ValueError(f"unknown speculation {speculation!r}: choose one of "
                             f"{', '.join(SPECULATION_METHODS)}")
        from atlas_rl.backends.vllm import engine as backend
        from atlas_rl.backends.vllm.proposer import install_atlas

        self.config = config or AtlasConfig()
        self.speculation = speculation
        self._backend = backend
        self.multiprocess = bool(multiprocess)
        if llm is None:
            self.model_path = resolve_model(model)
            self.llm = backend.build_llm(self.model_path, speculation, self.config,
                                         multiprocess=self.multiprocess, **vllm_engine_kwargs)
        else:  # adopt an engine built elsewhere (e.g. by TRL) with our speculative config
            self.model_path = model
            self.llm = llm
        if not self.multiprocess and self.config.cpu_reuse_freed_memory and backend.on_cpu():
            reuse_while_generating()  # freed blocks kept for the engine steps, not the trainer
        self.tokenizer = self.llm.get_tokenizer()
        # problems that would ruin rollouts (a BOS the tokenizer forgets, an end-of-turn
        # token that is no EOS): fixed here for prompts atlas-rl tokenizes, said once
        self.tokenizer_check = check_tokenizer(self.tokenizer, self.model_path)
        for problem in self.tokenizer_check.problems:
            (logger.info if "no chat template" in problem else logger.warning)(
                "atlas-rl: %s", problem)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self._vllm_counters = backend.VllmSpecCounters(self.llm)
        self.speculators: dict[str, Speculator] = {}
        self.proposer = None
        self._last_rollout_seconds = 0.0
        self._learn_counters = None  # the proposer's counters at the last learn
        self._totals = {"rollout_seconds": 0.0, "num_tokens": 0, "num_completions": 0,
                        "generate_calls": 0, "update_seconds": 0.0,
                        "nonfinite_generate_calls": 0}
        if self.multiprocess:
            from atlas_rl.backends.vllm.remote import RemoteProposer, RemoteWeightSync

            self._step_times = backend.NoStepTimes()
            self._weight_sync = RemoteWeightSync(self.llm, backend.transfer_directory(self.llm))
            if speculation in ("atlas", "atlas-static"):
                self.proposer = RemoteProposer(self.llm)
            return
        self._step_times = backend.StepTimes(self.llm)
        from atlas_rl.backends.vllm.weight_sync import WeightSync, free_reload_state_with

        self._free_reload_state = free_reload_state_with(backend.model_runner(self.llm))
        self._weight_sync = WeightSync(self.llm, self.model_path,
                                       allow_nonfinite=self.config.allow_nonfinite_weights,
                                       keep_previous=self.config.sync_rollback)
        if speculation in ("atlas", "atlas-static"):
            self.speculators = speculation_room.build_speculators(
                self.config, self.model_path, static=speculation == "atlas-static")
            self.proposer = backend.proposer(self.llm)
            if self.proposer is None:
                raise RuntimeError("vLLM did not build atlas-rl's AtlasProposer: build the "
                                   "engine with atlas-rl's speculative_config")
            self.proposer.attach(self.speculators,
                                 speculation_room.build_controller(self.config, self.speculators))
            install_atlas(backend.model_runner(self.llm), self.proposer, self.config.verifier)

    def close(self) -> None:
        """Shut vLLM's engine down now (with multiprocess=True: its engine core process)
        instead of at garbage collection."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        free = getattr(self, "_free_reload_state", None)
        if free is not None:  # in-process: vLLM's reload state would keep the model alive
            free()
        directory = getattr(self._weight_sync, "directory", None)
        if directory:  # a multiprocess engine's transfer directory
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
        release_freed_memory()  # what the engine freed, back to the OS

    @property
    def speculator(self):
        """The suffix index (the first speculator), or None without atlas speculation."""
        return next(iter(self.speculators.values()), None)

    @property
    def controller(self):
        return None if self.proposer is None else self.proposer.controller

    @classmethod
    def adopt(cls, llm, speculation: str = "atlas", config: AtlasConfig | None = None):
        """Wrap a `vllm.LLM` built elsewhere (in-process, with
        `backends.vllm.engine.speculative_config(speculation, config)` and
        `disable_log_stats=False`): the way integrations take over a trainer's engine."""
        return cls(llm.llm_engine.model_config.model, speculation, config, llm=llm)

    def begin_batch(self) -> None:
        """A new rollout batch starts (generate calls this; callers driving `self.llm`
        directly call it themselves): the speculator resets its in-flight state."""
        for spec in self.speculators.values():
            spec.begin_batch()
        if self.proposer is not None:
            self.proposer.begin_batch()

    def snapshot(self):
        """Counters to diff against later with `stats_since` (around calls to the vLLM
        engine made by someone else, e.g. a trainer)."""
        return self._snapshot()

    def stats_since(self, before, seconds: float, completions: list[Completion]) -> dict:
        """The stats of everything the engine generated since `before` (see `snapshot`)."""
        return self._stats_since(before, seconds, completions)

    def learn(self, sequences: Sequence[Sequence[int]], rollout_seconds: float | None = None) -> dict:
        """The adaptive speculators learn the rollouts just generated: the suffix index
        their token sequences (prompt + completion each), the neural drafter the policy's
        hidden states captured while generating them, for at most
        ``train_budget_fraction`` of ``rollout_seconds`` (default: the last batch's).

        Under torch.distributed (a data-parallel trainer: call it on every rank), every
        rank learns every rank's rollouts: the sequences, the prompts their requests
        started with (history drafting) and the captured hidden states are gathered,
        rank 0 trains the neural drafter and its published weights are broadcast, so that
        the speculators of all ranks stay identical.

        With ``multiprocess=True`` the proposer learns in vLLM's worker from what that
        worker generated since the last update (the same sequences, when this engine is
        its only client); `sequences` is not sent over."""
        if rollout_seconds is None:
            rollout_seconds = self._last_rollout_seconds
        if self.multiprocess:  # the worker learns what it generated
            if self.proposer is None:
                return {}
            out = self.proposer.learn(self.config.train_budget_fraction * rollout_seconds)
            self._totals["update_seconds"] += out.get("update_seconds", 0.0)
            return out
        if not self.speculators:
            return {}
        sequences = [list(s) for s in sequences]
        rank, size = ranks.world()
        if size == 1:
            return self._learn(sequences, rollout_seconds)
        sequences = [s for part in ranks.gather(sequences) for s in part]
        for spec in self.speculators.values():  # history drafting: every rank's prompts
            if hasattr(spec, "unlearned_prompts"):
                spec.add_unlearned([p for part in ranks.gather(spec.unlearned_prompts())
                                    for p in part])
        neural = self.speculators.get("neural")
        if not isinstance(neural, (NeuralSpeculator, Eagle3Speculator)) or neural.frozen:
            return self._learn(sequences, rollout_seconds)
        captured = ranks.gather(neural.take_captured())
        for rows in captured if rank == 0 else ():  # rank 0 trains for everyone
            if rows is not None:
                neural.add_captured(rows)
        update = self._learn(sequences, rollout_seconds, skip=() if rank == 0 else ("neural",))
        published = ranks.from_rank_zero(neural.published() if rank == 0 else None)
        if rank != 0:
            neural.load_published(published)
        return update

    def _learn(self, sequences: list[list[int]], rollout_seconds: float, skip=()) -> dict:
        out = speculation_room.learn_update(
            self.config, self.speculators, sequences, rollout_seconds,
            self._counters_since_learn(), getattr(self.controller, "drafting_could_pay", None),
            skip)
        self._totals["update_seconds"] += out["update_seconds"]
        return out

    def _counters_since_learn(self) -> SpecCounters | None:
        """The proposer's counters since the last `learn` (None without a proposer, or
        before any request-step)."""
        if self.proposer is None or not hasattr(self.proposer, "counters"):
            return None
        now = self.proposer.counters.copy()
        last, self._learn_counters = self._learn_counters, now
        if last is not None:
            now = now.since(last)
        return now if now.request_steps > 0 else None

    # --- generation ----------------------------------------------------------------

    def _prompt_ids(self, i: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            bos = self.tokenizer_check.bos_token_id
            if self.tokenizer_check.prepend_bos and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    f"prompt {i} is a list of chat messages, but the tokenizer of "
                    f"{self.model_path!r} has no chat template: pass plain strings or "
                    f"token ids, or use a model whose tokenizer has a chat template")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                                     tokenize=True)
            if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            ids = list(ids)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, numbers.Integral) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary "
                                 f"[0, {self.vocab_size}): {bad[:5]}")
        else:
            raise TypeError(
                f"prompt {i} is {type(prompt).__name__} {str(prompt)[:60]!r}: expected a "
                f"non-empty string, a list of chat messages ({{'role', 'content'}} dicts) "
                f"or a list of token ids")
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization: give it some text")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, but the engine's max_model_len is "
                f"{self.max_model_len}: shorten the prompt or build the engine with "
                f"AtlasConfig(max_model_len=...) above {len(ids)}")
        return ids

    def generate(self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, max_tokens: int = 256,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False) -> RolloutBatch:
        """Sample ``n`` completions per prompt. Completions of prompt i are contiguous.
        ``ignore_eos``: every completion runs to ``max_tokens`` (the benchmark's
        fixed-length regime: every method then generates the same tokens at the same
        batch size)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if isinstance(prompts, str):
            raise TypeError("prompts must be a list; wrap a single prompt as [prompt]")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (completions per prompt) must be an integer >= 1, got {n!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k != -1 and top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {top_k}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if self._weight_sync is not None and self._weight_sync.broken:
            from atlas_rl.backends.vllm.weight_sync import EngineBrokenError

            raise EngineBrokenError(self._weight_sync.broken)
        if len(prompts) == 0:
            return RolloutBatch([], self._stats_since(None, 0.0, []))

        ids = [self._prompt_ids(i, p) for i, p in enumerate(prompts)]
        stop = [stop] if isinstance(stop, str) else (list(stop) if stop else None)
        requests, params = [], []
        for i, prompt_ids in enumerate(ids):
            for j in range(n):
                index = i * n + j
                requests.append(TokensPrompt(prompt_token_ids=prompt_ids))
                params.append(SamplingParams(
                    n=1, temperature=temperature, top_p=top_p, top_k=top_k,
                    max_tokens=max_tokens, stop=stop, logprobs=1, ignore_eos=bool(ignore_eos),
                    stop_token_ids=None if ignore_eos else
                    list(self.tokenizer_check.extra_stop_token_ids) or None,
                    seed=None if seed is None else _completion_seed(seed, index)))

        self.begin_batch()
        before = self._snapshot()
        start = time.perf_counter()
        with generating():  # the engine steps reuse freed blocks (machine.py)
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start

        completions = []
        for index, out in enumerate(outputs):
            o = out.outputs[0]
            token_ids = list(o.token_ids)
            logprobs, top1 = [], []
            for tok, lp in zip(token_ids, o.logprobs or []):
                logprobs.append(lp[tok].logprob)
                top1.append(max(x.logprob for x in lp.values()))
            completions.append(Completion(
                prompt_index=index // n, prompt_ids=list(out.prompt_token_ids),
                completion_ids=token_ids, logprobs=logprobs, top1_logprobs=top1,
                finish_reason=o.finish_reason or "length", text=o.text))
        if any(_nonfinite_position(c) is not None for c in completions):
            self._totals["nonfinite_generate_calls"] += 1
            raise NonFiniteLogitsError(_nonfinite_message(completions))
        self._totals["rollout_seconds"] += seconds
        self._last_rollout_seconds = seconds
        self._totals["num_tokens"] += sum(len(c.completion_ids) for c in completions)
        self._totals["num_completions"] += len(completions)
        self._totals["generate_calls"] += 1
        return RolloutBatch(completions, self._stats_since(before, seconds, completions))

    # --- stats ---------------------------------------------------------------------

    def _snapshot(self):
        return (self._vllm_counters.counters.copy(),
                None if self.proposer is None else self.proposer.counters.copy(),
                self._step_times.snapshot())

    def _stats_since(self, before, seconds: float, completions: list[Completion]) -> dict:
        vllm_now, ours_now, times_now = self._snapshot()
        if before is None:
            vllm_c, ours_c, times = SpecCounters(), None, (0.0, 0.0, 0)
        else:
            vllm_c = vllm_now.since(before[0])
            ours_c = None if ours_now is None else ours_now.since(before[1])
            times = tuple(a - b for a, b in zip(times_now, before[2]))
        return self._summary(vllm_c, ours_c, times, seconds, completions)

    def _summary(self, vllm_c: SpecCounters, ours_c: SpecCounters | None, times: tuple,
                 seconds: float, completions: list[Completion]) -> dict:
        num_tokens = sum(len(c.completion_ids) for c in completions)
        stats = {"speculation": self.speculation}
        stats.update(summarize(None if self.speculation == "none" else vllm_c))
        if ours_c is not None:
            stats["request_steps"] = ours_c.request_steps
            stats["lookahead_hist"] = list(ours_c.lookahead_hist)
            stats["speculator_errors"] = ours_c.speculator_errors
            stats["propose_seconds"] = ours_c.propose_seconds
            stats["draft_seconds"] = ours_c.draft_seconds
            # Our own feedback bookkeeping, cross-checked against vLLM's scheduler.
            stats["proposer_num_draft_tokens"] = ours_c.num_draft_tokens
            stats["proposer_num_accepted_tokens"] = ours_c.num_accepted_tokens
            stats.update(summarize_arms(ours_c))
            stats.update(summarize_history(ours_c))
            stats.update(summarize_plans(ours_c))
        stats["rollout_seconds"] = seconds
        # Engine steps and where their time went (see StepTimes); the rest of
        # rollout_seconds is vLLM's scheduler, detokenization and output handling.
        stats["forward_seconds"], stats["sample_seconds"], stats["engine_steps"] = times
        stats["num_tokens"] = num_tokens
        stats["num_completions"] = len(completions)
        stats["tokens_per_s"] = num_tokens / seconds if seconds > 0 else 0.0
        if any(c.top1_logprobs for c in completions):
            stats["oracle_acceptance_length"] = oracle_acceptance_length(
                [c.top1_logprobs for c in completions], self.config.max_lookahead)
        return stats

    def stats(self) -> dict:
        """Cumulative stats over the engine's life (same names as a batch's stats)."""
        vllm_c, ours_c, times = self._snapshot()
        stats = self._summary(vllm_c, ours_c, times, self._totals["rollout_seconds"], [])
        stats["num_tokens"] = self._totals["num_tokens"]
        stats["num_completions"] = self._totals["num_completions"]
        stats["generate_calls"] = self._totals["generate_calls"]
        # generate calls refused for NaN/inf logits, and the logits rows the sampler saw so
        stats["nonfinite_generate_calls"] = self._totals["nonfinite_generate_calls"]
        stats["nonfinite_logit_rows"] = self._backend.nonfinite_logit_rows(self.llm)
        stats["update_seconds"] = self._totals["update_seconds"]
        stats["vllm_hooks"] = self._backend.hooks.status()  # what the seam installed
        secs = self._totals["rollout_seconds"]
        stats["tokens_per_s"] = self._totals["num_tokens"] / secs if secs > 0 else 0.0
        return stats

    # --- learning, weights, state --------------------------------------------------

    def update(self, batch: RolloutBatch) -> dict:
        """The adaptive speculator learns the batch's rollouts (prompt + completion)."""
        return self.learn([c.prompt_ids + c.completion_ids for c in batch],
                          batch.stats.get("rollout_seconds"))

    def sync_weights(self, model_or_state_dict, *, copy: bool = False) -> None:
        """Load new policy weights (an nn.Module, a state dict, or (name, tensor) pairs
        with checkpoint names; a PEFT LoRA model goes in merged, its base untouched) into
        the running engine, all or nothing; the prefix cache is reset and the speculators'
        state kept.

        Every tensor is checked first (a parameter of the engine's checkpoint, its shape,
        a floating dtype, finite unless ``AtlasConfig.allow_nonfinite_weights``): a bad one
        raises `WeightSyncError` naming it, and nothing is loaded. If the load itself fails
        midway, the previous weights are restored and the error re-raised. ``copy=True``:
        copy each tensor as it is read (for iterators whose tensors change once iteration
        ends, e.g. merged PEFT adapters or gathered ZeRO-3 shards)."""
        from atlas_rl.backends.vllm.weight_sync import named_weights

        weights = named_weights(model_or_state_dict)
        if self.multiprocess:  # the worker checks, loads and re-points its drafter
            self._weight_sync.sync(weights)
            return
        with one_off_allocations():  # vLLM's reload: large blocks, each allocated once
            self._weight_sync.sync(weights, copy=copy)
            if self.proposer is not None:  # the drafter re-reads the policy's embedding, head
                self.proposer.policy_weights_changed(
                    self._backend.model_runner(self.llm).get_model())

    def save(self, directory: str | Path) -> None:
        """Every speculator's state (safetensors + JSON) and the controller's
        calibration and cost model: `load` restores the run's speculation exactly. The
        write is atomic: a crash mid-save leaves the previous state loadable."""
        if self.multiprocess:
            if self.proposer is not None:
                self.proposer.save(directory)
            return
        speculation_room.save_state(directory, self.speculation, self.config, self.speculators,
                                    self.controller)

    def load(self, directory: str | Path) -> None:
        """Restore the speculators and the controller saved by `save`."""
        if self.multiprocess:
            if self.proposer is not None:
                self.proposer.load(directory)
            return
        if not self.speculators:
            return
        speculation_room.load_state(directory, self.speculators, self.controller)
