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
    cut at max_tokens is judged on its complete lines only (none: 0.0); one that writes
    no code at all gets 0.0 (a stub with its docstring compiles, but is no answer: under
    RL an empty completion would otherwise be the easiest reward)."""
    if not text.strip():
        return 0.0
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


_JS_STRING = re.compile(r"//[^\n]*|/\*.*?\*/|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"|`(?:\\.|[^`\\])*`",
                        re.DOTALL)
_CLOSING = {")": "(", "]": "[", "}": "{"}


def js_function_reward(code_prompt: str, text: str, finished: bool) -> float:
    """1.0 if the completion closes the JavaScript function `code_prompt` opens, with
    its brackets matched (comments and string literals aside), else 0.0; nothing
    written: 0.0. There is no JavaScript parser here: this is the syntax check's
    stand-in, the part of it a model gets wrong most."""
    if not text.strip():
        return 0.0
    stack = []
    for ch in _JS_STRING.sub("", code_prompt + text):
        if ch in "([{":
            stack.append(ch)
        elif ch in _CLOSING:
            if not stack or stack.pop() != _CLOSING[ch]:
                return 0.0
            if not stack and ch == "}":
                return 1.0  # the function's own brace closed
    return 0.0


def rollout_reward(text: str, answer: str | None, num_tokens: int, max_tokens: int,
                   finished: bool, code_prompt: str | None = None,
                   length_weight: float = 0.2, language: str = "python") -> float:
    """The benchmark's reward: correctness + 0.2 format (checkable prompts only)
    + 0.5 syntax (code prompts only: Python compiles; JavaScript: the function closes
    with matched brackets) + `length_weight` (0.2) length + 0.1 plain text.
    `length_weight` 0 takes brevity out: with large policy steps, the length term is
    what GRPO learns first, and it drives completions to a few tokens."""
    r = length_weight * length_reward(num_tokens, max_tokens, finished) + \
        0.1 * plain_text_reward(text)
    if code_prompt is not None:
        check = js_function_reward if language == "javascript" else syntax_reward
        r += 0.5 * check(code_prompt, text, finished)
    if answer is not None:
        r += correctness_reward(text, answer) + 0.2 * format_reward(text)
    return r


# --- reward functions with TRL's signature ------------------------------------------
# TRL calls reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns)
# and wants one float per completion; conversational completions are message lists.

def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion should be a string or a list of chat messages, got "
                    f"{type(completion).__name__}")


def correctness(completions, answer=None, **kwargs) -> list[float]:
    """1.0 where the completion's final number equals the dataset's `answer` column."""
    if answer is None:
        raise ValueError("the 'correctness' reward needs an 'answer' column in the dataset "
                         "(builtin:math and GSM8K-style JSONL files have one)")
    return [correctness_reward(_text(c), None if a is None else str(a))
            for c, a in zip(completions, answer)]


def answer_format(completions, **kwargs) -> list[float]:
    """1.0 where the completion has a line 'Answer: <number>'."""
    return [format_reward(_text(c)) for c in completions]


def brevity(completions, completion_ids=None, max_completion_length=None, **kwargs) -> list[float]:
    """Shorter is better: 1 - tokens / longest completion in the batch (0.0 for the longest)."""
    lengths = ([len(ids) for ids in completion_ids] if completion_ids is not None
               else [len(_text(c)) for c in completions])
    top = max(max(lengths), 1)
    return [1.0 - n / top for n in lengths]


def plain_text(completions, **kwargs) -> list[float]:
    """Share of printable ASCII in the completion."""
    return [plain_text_reward(_text(c)) for c in completions]


REWARD_FUNCS = {"correctness": correctness, "answer_format": answer_format,
                "brevity": brevity, "plain_text": plain_text}


def get_reward_funcs(names) -> list:
    """TRL reward functions by name (recipes list them under `reward_funcs`)."""
    out = []
    for name in names:
        if name not in REWARD_FUNCS:
            raise ValueError(f"unknown reward function {name!r}: choose from "
                             f"{', '.join(REWARD_FUNCS)}")
        out.append(REWARD_FUNCS[name])
    return out
