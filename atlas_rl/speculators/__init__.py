"""Speculators: draft tokens with per-token confidence; no knowledge of vLLM."""

from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, Speculator
from atlas_rl.speculators.drafter_net import DrafterNet
from atlas_rl.speculators.neural import NeuralSpeculator
from atlas_rl.speculators.suffix import NGramIndex, SuffixSpeculator

__all__ = ["Draft", "DrafterNet", "EMPTY_DRAFT", "NGramIndex", "NeuralSpeculator", "Speculator",
           "SuffixSpeculator"]
