"""What a generate call returns to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    prompt_index: int            # which prompt of the call (completions of one prompt share it)
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]        # of each sampled token, under the distribution sampled from
    finish_reason: str           # "stop" (EOS or a stop string) or "length"
    text: str = ""
    top1_logprobs: list[float] = field(default_factory=list)  # most likely token's, per position


@dataclass
class RolloutBatch:
    """Completions in prompt order (the n completions of prompt i are contiguous) and
    the call's speculation stats (metric names: atlas_rl.metrics)."""

    completions: list[Completion] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)

    def __iter__(self):
        return iter(self.completions)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [c.prompt_ids for c in self.completions]

    @property
    def completion_ids(self) -> list[list[int]]:
        return [c.completion_ids for c in self.completions]

    @property
    def logprobs(self) -> list[list[float]]:
        return [c.logprobs for c in self.completions]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.completion_ids) for c in self.completions)
