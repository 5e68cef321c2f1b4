"""Speculators: draft tokens with per-token confidence; no knowledge of vLLM."""

from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, Speculator
from atlas_rl.speculators.suffix import NGramIndex, SuffixSpeculator

__all__ = ["Draft", "EMPTY_DRAFT", "NGramIndex", "Speculator", "SuffixSpeculator"]
