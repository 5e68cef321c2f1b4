"""AtlasConfig: every knob of the rollout engine, as a dataclass whose fields carry
`help` metadata, so the same class gives CLI flags and YAML (HfArgumentParser / TrlParser)
beside a TRL config."""

from __future__ import annotations

import numbers
import types
import typing
from dataclasses import asdict, dataclass, field, fields

SPECULATION_METHODS = ("atlas", "atlas-static", "none", "vllm-ngram", "vllm-suffix")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
VERIFIERS = ("atlas", "vllm")
PUBLISH_GATES = ("next-batch", "held-out", "off")
#: the MLP drafter's training losses (`speculators.distill.distill_loss`)
DRAFTER_LOSSES = ("tv", "ce")


@dataclass
class AtlasConfig:
    max_lookahead: int = field(default=8, metadata={
        "help": "Most draft tokens per request and step (vLLM num_speculative_tokens); "
                "also the lookahead of the vllm-ngram / vllm-suffix peers."})
    max_speculation_batch_size: int | None = field(default=None, metadata={
        "help": "Optional hard cap: no speculation while more requests than this are "
                "running. Default: none; the controller's cost model, measured online, "
                "switches speculation off where it loses."})
    static_speculator: str | None = field(default="auto", metadata={
        "help": "Directory of a static neural drafter (`atlas-rl train-speculator --out "
                "DIR`): the speed floor, loaded frozen for atlas-static and as the warm "
                "start of atlas's adaptive drafter. 'auto': the one bundled for the model, "
                "if any; 'none' (or empty): no static drafter (atlas starts its drafter "
                "from scratch)."})
    drafter: str = field(default="auto", metadata={
        "help": "The neural drafter's architecture: 'eagle3' (one decoder layer over the "
                "policy's features at three layers; needs a static drafter made by "
                "`atlas-rl train-speculator`), 'mlp' (one residual MLP block over the last "
                "hidden state), or 'auto': mlp where the static drafter directory holds "
                "one (the bundled directory holds both: on a 2-core CPU the EAGLE-3 drafter "
                "is accepted more but its drafting costs what it saves, BENCHMARKS.md), "
                "else eagle3."})
    neural_drafter: bool = field(default=True, metadata={
        "help": "Use the neural drafter beside the suffix index (off: suffix only)."})
    draft_vocab_size: int = field(default=4096, metadata={
        "help": "Tokens the neural drafter can propose (the most frequent ones): its LM "
                "head cost per draft token is proportional to this."})
    drafter_lr: float = field(default=1e-3, metadata={
        "help": "Learning rate (AdamW) of the adaptive drafter's online distillation (the "
                "EAGLE-3 drafter, a distilled decoder layer, fine-tunes at a third of it)."})
    drafter_loss: str = field(default="tv", metadata={
        "help": "The MLP drafter's training loss, online and in `atlas-rl train-speculator`: "
                "'tv', the total variation between its q and the policy's p (what a "
                "distribution draft loses of acceptance) plus 0.1 x the cross-entropy, or "
                "'ce', the cross-entropy alone. Replayed on four domain gaps, 'tv' adapted "
                "2-8 points further towards a domain oracle in the same budget. The EAGLE-3 "
                "drafter always trains on TV."})
    drafter_publish_gate: str = field(default="next-batch", metadata={
        "help": "How an adaptive drafter's update is judged on rollouts it has not trained "
                "on. 'next-batch' (MLP drafter): every update trains on the whole batch and "
                "is published; the next update first scores it against the drafter it "
                "replaced on the new batch and rolls back if it is lower by more than two "
                "standard errors (nothing held out; a bad update drafts for one batch). "
                "'held-out': the update trains without the batch's last quarter and is "
                "published unless it scores lower there (the MLP drafter: by more than two "
                "standard errors; the EAGLE-3 drafter, whose gate is always this one: at "
                "all). 'off' (or false): every update that does not diverge is published. "
                "true: the default. Replayed on domain gaps the three adapt alike, within "
                "2-4 points of the way to a domain oracle (scripts/replay_adaptation.py)."})
    train_budget_fraction: float = field(default=0.1, metadata={
        "help": "The adaptive drafter trains after each rollout batch for at most this "
                "share of the batch's rollout time (measured and reported). 0: it never "
                "trains (the suffix index still learns)."})
    learn_where_drafting_pays: bool = field(default=True, metadata={
        "help": "Learning that pays: the adaptive drafter's training budget after a batch is "
                "train_budget_fraction x its rollout time x the share of its request-steps "
                "at batch sizes where a surely accepted draft token pays for its "
                "verification (the controller's step-cost model): where batches are too "
                "large for speculation to pay (a loaded server, a 64-sequence CPU batch), "
                "a better drafter gains nothing, so it learns little; in the tail, where "
                "a better drafter is what is missing, it gets the whole share. Off: the "
                "whole share after every batch."})
    learn_min_drafted_fraction: float = field(default=0.05, metadata={
        "help": "The neural drafter trains after a batch (in an engine and in a server "
                "alike) only if the controller drafted on at least this share of the "
                "request-steps since the last update: a drafter "
                "that is not drafting (e.g. batches too large for speculation to pay) costs "
                "its training budget for nothing. What it captured meanwhile waits in its "
                "replay buffer; the suffix index always learns (it is cheap). 0: always train."})
    speculate_always: bool = field(default=False, metadata={
        "help": "Bypass the controller's cost model and draft every proposal in full (for "
                "tests and debugging: exercises verification, usually slower)."})
    explore: float = field(default=0.05, metadata={
        "help": "Share of choices the controller spends trying a non-best arm (speculator "
                "and draft kind), so it notices when another becomes better."})
    verifier: str = field(default="atlas", metadata={
        "help": "Who verifies atlas's drafts inside vLLM: 'atlas' (atlas-rl's rejection "
                "sampler: sparse draft distributions, no per-step vocabulary-wide noise) or "
                "'vllm' (vLLM's own, with dense draft distributions). Both are lossless."})
    ngram_sizes: tuple[int, ...] = field(default=(2, 3, 4, 6), metadata={
        "help": "n-gram lengths the suffix speculator matches, longest first."})
    max_corpus_tokens: int = field(default=2_000_000, metadata={
        "help": "Bound on the tokens of past rollouts the suffix speculator keeps (FIFO)."})
    max_history_tokens: int = field(default=1_000_000, metadata={
        "help": "History drafting: bound on the tokens of earlier completions the suffix "
                "speculator keeps keyed by prompt, over all prompts (least recently used "
                "prompts evicted first); a request of a prompt seen before drafts from "
                "them, and from its live siblings, first. 0: keep none (siblings still)."})
    max_finished_live: int = field(default=1024, metadata={
        "help": "Most finished requests whose contexts keep drafting for the live ones (a "
                "batch's all do until it ends; a server, which has no batches, drops the "
                "oldest half past this bound)."})
    max_model_len: int = field(default=2048, metadata={
        "help": "Longest prompt + completion the engine accepts, in tokens."})
    dtype: str | None = field(default=None, metadata={
        "help": "Weights and activations dtype. Default: bfloat16, except on CPUs without "
                "native bf16 (no AVX512-BF16/AMX), where float32 is about 2x faster."})
    enforce_eager: bool | None = field(default=None, metadata={
        "help": "Skip torch.compile in vLLM. Default: eager on the CPU, where compiling "
                "costs over a minute per engine; compiled on GPUs."})
    cpu_kv_cache_gib: float = field(default=2, metadata={
        "help": "KV cache size in GiB on the CPU backend (vLLM's kv_cache_memory_bytes; "
                "fractions allowed, e.g. 0.5), unless VLLM_CPU_KVCACHE_SPACE is set."})
    cpu_reuse_freed_memory: bool = field(default=True, metadata={
        "help": "On the CPU backend, have glibc's malloc keep freed blocks for reuse where "
                "the engine steps run: otherwise every step's [requests, vocabulary] "
                "tensors over 32 MiB are mapped and page-faulted afresh (at 64 sequences "
                "and a 262k vocabulary sampling took 3x its time). An in-process engine "
                "keeps them while it generates only, so a trainer beside it peaks as "
                "before; a multiprocess engine's core process all the time. Off: the "
                "system's default. An allocator you chose (LD_PRELOAD, MALLOC_* or "
                "GLIBC_TUNABLES) is left as it is."})
    allow_nonfinite_weights: bool = field(default=False, metadata={
        "help": "Let sync_weights load weights with NaN or inf values. Off by default: a "
                "diverged policy update would otherwise yield garbage rollouts (e.g. one "
                "token repeated) without a word; turn on only to debug such a policy."})
    sync_rollback: bool = field(default=True, metadata={
        "help": "Keep a host copy of the last synced weights (the model's size in the "
                "engine's dtype) so that a sync whose load fails midway restores them and "
                "the engine keeps serving. Off: saves that memory; such a failure then "
                "leaves the engine unusable (it refuses to generate)."})
    seed: int = field(default=0, metadata={"help": "Engine seed (sampling without a per-call seed)."})
    logprobs_mode: str = field(default="processed_logprobs", metadata={
        "help": "processed_logprobs: logprobs of the distribution actually sampled "
                "(after temperature / top-k / top-p), what importance weights need; "
                "raw_logprobs: the model's unprocessed log-softmax."})

    def __post_init__(self):
        if self.max_lookahead < 1:
            raise ValueError(f"max_lookahead must be >= 1, got {self.max_lookahead}")
        if self.max_speculation_batch_size is not None and self.max_speculation_batch_size < 0:
            raise ValueError("max_speculation_batch_size must be >= 0 or None (no cap), got "
                             f"{self.max_speculation_batch_size}")
        if not 0.0 <= self.train_budget_fraction <= 1.0:
            raise ValueError("train_budget_fraction must be in [0, 1] (a share of the rollout "
                             f"time), got {self.train_budget_fraction}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if not 0.0 <= self.learn_min_drafted_fraction <= 1.0:
            raise ValueError("learn_min_drafted_fraction must be in [0, 1] (a share of request-"
                             f"steps), got {self.learn_min_drafted_fraction}")
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"explore must be in [0, 1), got {self.explore}")
        if self.draft_vocab_size < 2:
            raise ValueError(f"draft_vocab_size must be >= 2, got {self.draft_vocab_size}")
        if self.drafter not in ("auto", "eagle3", "mlp"):
            raise ValueError(f"drafter must be 'auto', 'eagle3' or 'mlp', got {self.drafter!r}")
        if self.drafter_lr <= 0:
            raise ValueError(f"drafter_lr must be > 0, got {self.drafter_lr}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got "
                             f"{self.logprobs_mode!r}")
        if not self.cpu_kv_cache_gib >= 1 / 16:
            raise ValueError("cpu_kv_cache_gib must be a number of GiB >= 0.0625 (64 MiB), "
                             f"got {self.cpu_kv_cache_gib}")
        check_history_budget(self.max_history_tokens)
        self.drafter_publish_gate = publish_gate(self.drafter_publish_gate)
        self.drafter_loss = drafter_loss(self.drafter_loss)
        self.ngram_sizes = tuple(int(n) for n in self.ngram_sizes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ngram_sizes"] = list(self.ngram_sizes)
        return d

    @classmethod
    def from_dict(cls, values: dict, where: str = "AtlasConfig") -> AtlasConfig:
        """An AtlasConfig from JSON-like values (a speculative config's ``atlas`` fields,
        a saved state), each checked against its field's type first: an unknown or
        ill-typed field is refused with the valid fields and the type wanted."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object of AtlasConfig fields, got "
                             f"{type(values).__name__} {values!r}")
        # resolved here, not read from fields(): HfArgumentParser rewrites those in place
        hints = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"valid fields: {', '.join(known)}")
        for name, value in values.items():
            if name == "drafter_publish_gate" and isinstance(value, bool):
                continue  # true / false, as before it named its kinds (`publish_gate`)
            if not _type_ok(value, hints[name]):
                raise ValueError(f"{where}: field {name!r} must be {_type_name(hints[name])}, "
                                 f"got {type(value).__name__} {value!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def parse_field_settings(items, flag: str = "--set") -> dict:
    """``FIELD=VALUE`` strings (a CLI's repeatable ``--set``) as a dict, each VALUE read as
    JSON where it is JSON (numbers, true/false, null, lists), else kept as a string; the
    fields and types are checked by `AtlasConfig.from_dict`."""
    import json

    fields_: dict = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes FIELD=VALUE (VALUE as JSON, or a bare string), "
                             f"got {item!r}")
        try:
            fields_[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields_[key] = raw
    return fields_


def drafter_loss(kind: str) -> str:
    """A drafter loss name checked against `DRAFTER_LOSSES`; anything else is refused,
    naming the choices."""
    name = str(kind).strip().lower()
    if name not in DRAFTER_LOSSES:
        raise ValueError(f"drafter_loss {kind!r} is not one of {', '.join(DRAFTER_LOSSES)}: "
                         f"'tv' trains on total variation (what acceptance loses) plus 0.1 x "
                         f"the cross-entropy, 'ce' on the cross-entropy alone")
    return name


def publish_gate(gate: str | bool) -> str:
    """A publish gate setting as one of `PUBLISH_GATES` (true: the default, "next-batch";
    false: "off"); anything else is refused, naming the choices."""
    if isinstance(gate, bool):
        return PUBLISH_GATES[0] if gate else "off"
    mode = str(gate).strip().lower().replace("_", "-")
    mode = {"true": PUBLISH_GATES[0], "on": PUBLISH_GATES[0], "false": "off",
            "none": "off"}.get(mode, mode)
    if mode not in PUBLISH_GATES:
        raise ValueError(f"drafter_publish_gate {gate!r} is not one of "
                         f"{', '.join(PUBLISH_GATES)} (or true/false): 'next-batch' judges "
                         f"each update on the next batch, 'held-out' on a held-out quarter of "
                         f"its own, 'off' publishes every update")
    return mode


def _type_ok(value, tp) -> bool:
    """Does a JSON value fit a field type of AtlasConfig?"""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    return True


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"tuple[{_type_name(typing.get_args(tp)[0])}, ...]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_history_budget(max_history_tokens) -> None:
    """`max_history_tokens` must be a whole number of tokens >= 0."""
    if isinstance(max_history_tokens, bool) or not isinstance(max_history_tokens, numbers.Integral) \
            or max_history_tokens < 0:
        raise ValueError(
            f"max_history_tokens must be an integer >= 0 (the tokens of earlier completions "
            f"the suffix index keeps per prompt for history drafting), got "
            f"{max_history_tokens!r}: set AtlasConfig(max_history_tokens=...) to e.g. "
            f"1_000_000, or to 0 to keep no earlier completions")
