"""Verifiable rewards for RL on the workloads atlas-rl builds (and for recipes).

Each function scores one completion; `rollout_reward` combines them the way the
benchmark's policy updates use them:
- answer correctness (1.0) where the prompt has a checkable answer,
- format (0.2): the completion states its result as 'Answer: <number>',
- length (up to 0.2): completions that stop on their own, earlier rather than later,
- plain text (up to 0.1): the share of printable ASCII characters (code and English
  stay in it; a policy that drifts into other scripts or byte garbage does not).
- syntax (0.5, code prompts): the function stub plus the completion's complete lines
  compiles as Python.
Prompts without an answer get the length and plain-text terms (and syntax for code).
"""

from __future__ import annotations

import re
import warnings

from atlas_rl.workloads import extract_answer

_ANSWER_LINE = re.compile(r"^\s*\**answer\**\s*[:=]\s*\$?-?[\d,]*\.?\d+", re.IGNORECASE | re.MULTILINE)


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a.strip() == b.strip()


def correctness_reward(text: str, answer: str | None) -> float:
    """1.0 if the completion's final answer equals `answer`, else 0.0 (None: 0.0)."""
    if answer is None:
        return 0.0
    got = extract_answer(text)
    return 1.0 if got is not None and _same_number(got, str(answer)) else 0.0


def format_reward(text: str) -> float:
    """1.0 if some line reads 'Answer: <number>', else 0.0."""
    return 1.0 if _ANSWER_LINE.search(text) else 0.0


def length_reward(num_tokens: int, max_tokens: int, finished: bool) -> float:
    """1 - num_tokens / max_tokens for a completion that stopped by itself, 0.0 for one
    cut at max_tokens."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    return max(0.0, 1.0 - num_tokens / max_tokens) if finished else 0.0


def plain_text_reward(text: str) -> float:
    """Share of the text's characters that are printable ASCII or whitespace (1.0 for
    an empty text)."""
    if not text:
        return 1.0
    return sum(1 for ch in text if " " <= ch <= "~" or ch in "\n\t") / len(text)


def syntax_reward(code_prompt: str, text: str, finished: bool) -> float:
    """1.0 if `code_prompt` + the completion compiles as Python, else 0.0. A completion
    cut at max_tokens is judged on its complete lines only (none: 0.0)."""
    if not finished:
        text = text[: text.rindex("\n") + 1] if "\n" in text else ""
        if not text.strip():
            return 0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences
            compile(code_prompt + text, "<completion>", "exec")
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return 0.0
    return 1.0


def rollout_reward(text: str, answer: str | None, num_tokens: int, max_tokens: int,
                   finished: bool, code_prompt: str | None = None) -> float:
    """The benchmark's reward: correctness + 0.2 format (checkable prompts only)
    + 0.5 syntax (code prompts only) + 0.2 length + 0.1 plain text."""
    r = 0.2 * length_reward(num_tokens, max_tokens, finished) + 0.1 * plain_text_reward(text)
    if code_prompt is not None:
        r += 0.5 * syntax_reward(code_prompt, text, finished)
    if answer is not None:
        r += correctness_reward(text, answer) + 0.2 * format_reward(text)
    return r
