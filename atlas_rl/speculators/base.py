"""The speculator contract (docs/architecture.md, "The speculator contract"): draft for
many requests at once, with a confidence per draft token; learn from rollouts and from
acceptance feedback; save and load as safetensors + JSON. Speculators know nothing of
vLLM: the proposer (`atlas_rl.backends.vllm.proposer`) calls exactly the methods below.

`Speculator` drafts from token contexts; `HiddenStateSpeculator` also reads the policy's
hidden states, which the proposer captures at the positions vLLM sampled from and hands
over with `capture`, after `attach_target` gave it the policy's embedding and LM head."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol, Sequence

import torch

ONE_HOT, DISTRIBUTION = "one-hot", "distribution"
DraftKind = Literal["one-hot", "distribution"]


class Stop(Protocol):
    """Tells a learning loop to end early (a `threading.Event`): checked between its
    optimizer steps, so it ends within one of them."""

    def is_set(self) -> bool: ...


def stopped(stop: Stop | None) -> bool:
    return stop is not None and stop.is_set()


@dataclass(frozen=True)
class Arm:
    """What the controller chooses between: a speculator and a kind of draft (one-hot, or
    a distribution draft whose q goes to the verifier). ``label`` is the arm's name in
    metrics and saved state ("suffix", "suffix-dist", ...)."""

    speculator: str
    draft_kind: DraftKind = ONE_HOT

    @property
    def label(self) -> str:
        return f"{self.speculator}-dist" if self.draft_kind == DISTRIBUTION else self.speculator

    @classmethod
    def of(cls, draft: "Draft") -> "Arm":
        return cls(draft.source, DISTRIBUTION if draft.is_distribution else ONE_HOT)

    @classmethod
    def both(cls, speculator: str) -> tuple["Arm", "Arm"]:
        return cls(speculator, ONE_HOT), cls(speculator, DISTRIBUTION)

@dataclass
class Draft:
    """Draft tokens for one request.

    ``confidence[i]`` is the speculator's own estimate that the policy accepts token i
    given that tokens < i were accepted (a conditional probability). A *distribution
    draft* sampled token i from q_i and hands q_i to the verifier (which then accepts it
    with probability 1 - TV(p_i, q_i)); q_i is sparse: probabilities ``q[i]`` on token ids
    ``q_ids[i]`` (both [len, m]; padding has probability 0). One-hot drafts leave both None.
    ``source`` names the speculator that drafted it. ``from_history``: drafted from the
    request's own prompt's corpus (earlier completions of that prompt, live siblings of
    its group) rather than from a global one; it only tells the metrics apart.
    """

    tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    q_ids: torch.Tensor | None = None
    q: torch.Tensor | None = None
    source: str = ""
    from_history: bool = False

    @property
    def is_distribution(self) -> bool:
        return self.q is not None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def arm(self) -> Arm:
        return Arm.of(self)

    def truncate(self, n: int) -> "Draft":
        if n >= len(self.tokens):
            return self
        return Draft(self.tokens[:n], self.confidence[:n],
                     None if self.q_ids is None else self.q_ids[:n],
                     None if self.q is None else self.q[:n], self.source, self.from_history)


EMPTY_DRAFT = Draft()


class Speculator(ABC):
    """Drafts continuations of token contexts; learns from what the policy produced."""

    #: short name used in stats and saved state
    name: ClassVar[str] = "speculator"
    #: whether the proposer hands it the policy's hidden states (`HiddenStateSpeculator`)
    uses_hidden_states: ClassVar[bool] = False
    #: whether `propose_both` drafts each request both ways, one-hot and as a
    #: distribution draft, for about the cost of one (a suffix lookup is shared by both;
    #: the MLP drafter drafts its rows twice in one pass, bound at a tail's few requests
    #: by reading its head; an EAGLE-3 drafter's per-request key/value history is not
    #: doubled). The controller then picks the kind per request by its calibrated value,
    #: instead of one kind per speculator and step.
    drafts_both_kinds: ClassVar[bool] = False
    #: the largest batch (requests in the step) at which it drafts both kinds; above it
    #: the controller asks for one kind per step (None: any batch, where both cost one)
    both_kinds_max_batch: ClassVar[int | None] = None

    @abstractmethod
    def propose(self, keys: Sequence[str], contexts: Sequence[Sequence[int]],
                max_lengths: Sequence[int], sample: Sequence[bool] | None = None
                ) -> list[Draft]:
        """Draft up to ``max_lengths[i]`` tokens continuing ``contexts[i]``.

        ``keys`` identify requests across steps (the context of a key only grows
        between calls, until ``finish(key)``). ``sample[i]``: draft request i as a
        distribution draft (tokens sampled from q, q in the Draft) where the speculator
        can; otherwise, or with ``sample=None``, one-hot.
        """

    def propose_both(self, keys: Sequence[str], contexts: Sequence[Sequence[int]],
                     max_lengths: Sequence[int]) -> list[tuple[Draft, Draft]]:
        """Per request, its one-hot draft and its distribution draft (either may be
        empty). Part of the contract only where `drafts_both_kinds` is True (the
        controller asks no other speculator for it); the others draft one kind per call."""
        raise NotImplementedError(f"{type(self).__name__} drafts one kind per call "
                                  "(drafts_both_kinds is False): call propose")

    def begin_request(self, key: str, prompt: Sequence[int]) -> None:
        """Request ``key`` starts: its contexts begin with the token ids ``prompt`` (its
        prompt; what follows is its completion). Called once per request, before the
        first `propose` that includes it, where the engine knows where prompts end
        (otherwise never: speculators must draft without it)."""

    def feedback(self, key: str, draft: Draft, num_accepted: int) -> None:
        """The verifier accepted the first ``num_accepted`` tokens of ``draft``."""

    def finish(self, key: str) -> None:
        """Request ``key`` ended; forget its per-request state."""

    def learn(self, sequences: Sequence[Sequence[int]], time_budget: float | None = None,
              stop: Stop | None = None) -> dict[str, float]:
        """Learn from finished rollouts (prompt + completion token ids), within
        `time_budget` seconds where learning takes time, and ending early once `stop` is
        set (a server's idle-time learner, when the engine needs the CPU again). Returns
        stats."""
        return {}

    def begin_batch(self) -> None:
        """A new generate call starts (live per-batch state may be reset)."""

    # --- state: safetensors for tensors, JSON for the rest (never pickle) ---------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `state()` returned (stateless speculators have nothing to do)."""

    def save(self, directory: str | Path) -> None:
        """Write ``{name}.safetensors`` and ``{name}.json`` into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(directory / f"{self.name}.safetensors"))
        (directory / f"{self.name}.json").write_text(
            json.dumps({"name": self.name, **meta}, indent=2))

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / f"{self.name}.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no saved state for speculator {self.name!r} in {str(directory)!r} "
                f"(expected {meta_path.name}); save one with engine.save(dir) first")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(directory / f"{self.name}.safetensors"))
        self.load_state(tensors, meta)


def drafter_reads_policy(speculators, embed: torch.Tensor, head: torch.Tensor) -> bool | None:
    """Whether every hidden-state drafter among `speculators` reads the policy's current
    token embedding and LM head (`embed`, `head`: the served model's tensors now): its
    references hold the same values, and the head rows it drafts through are those rows
    of `head` (no stale or zeroed copy survives a sync). None without such a drafter."""
    readers = [s for s in speculators if isinstance(s, HiddenStateSpeculator)]
    if not readers:
        return None
    for spec in readers:
        own_embed, own_head = getattr(spec, "_embed", None), getattr(spec, "_head", None)
        if own_embed is None or own_head is None or not torch.equal(own_embed, embed) \
                or not torch.equal(own_head, head):
            return False
        rows = spec.draft_head_rows()
        if rows is not None:
            ids, drafted = rows
            if not torch.equal(drafted, head.detach().index_select(0, ids.to(head.device)).float()):
                return False
    return True


class HiddenStateSpeculator(Speculator):
    """A speculator that drafts from the policy's own hidden states (a neural drafter)."""

    uses_hidden_states: ClassVar[bool] = True

    @abstractmethod
    def attach_target(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """The policy's token embedding and LM head [V, d] (references: weight syncs
        that update them in place are seen by the speculator)."""

    @abstractmethod
    def capture(self, key: str, hidden: torch.Tensor, tokens: Sequence[int],
                first_pos: int) -> None:
        """The policy computed ``hidden[i]`` at position ``first_pos + i`` of request
        `key` and sampled ``tokens[i]`` from it. `hidden` is memory the caller gives
        away (the proposer copies vLLM's reused buffer once per step)."""

    def capture_batch(self, keys: Sequence[str], hidden: torch.Tensor,
                      tokens: Sequence[Sequence[int]], first_positions: Sequence[int],
                      offsets: Sequence[int], aux: torch.Tensor | None = None) -> None:
        """One engine step's captures: request ``keys[i]``'s rows are ``offsets[i] :
        offsets[i] + len(tokens[i])`` of `hidden` (and of `aux`, the features at
        `aux_layers` for drafters that read them). Override to batch the work."""
        for key, toks, first, off in zip(keys, tokens, first_positions, offsets):
            if len(toks):
                self.capture(key, hidden[off:off + len(toks)], toks, first)

    def draft_head_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(draft vocabulary ids [S], the LM-head rows [S, d] the drafter drafts through
        now, float32), refreshed from the policy's head if a sync made them stale; None
        where the drafter holds no head rows of its own. What `drafter_reads_policy`
        checks against the policy after a weight sync."""
        return None

    def weights_synced(self) -> None:
        """The policy's weights changed (after `attach_target`'s tensors were updated):
        drop anything derived from them."""
