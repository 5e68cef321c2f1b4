"""Prompt sets atlas-rl builds itself (no dataset assumed): a code domain from the
docstrings of the local Python standard library, the same tasks in JavaScript, and a math
domain of arithmetic word problems from templates, each with a checkable answer."""

from __future__ import annotations

import importlib
import inspect
import random
import re
from dataclasses import dataclass, field

_CODE_MODULES = ("textwrap", "string", "json", "heapq", "bisect", "statistics", "fractions",
                 "difflib", "shlex", "fnmatch", "posixpath", "calendar", "colorsys", "html",
                 "base64", "copy", "functools", "itertools", "operator", "random", "re",
                 "glob", "gzip", "ipaddress", "keyword", "linecache", "locale", "mimetypes",
                 "ntpath", "pathlib", "pprint", "quopri", "secrets", "tokenize", "urllib.parse",
                 "uuid", "zipfile", "csv", "email.utils", "http.cookies")

MATH_SYSTEM = ("Solve the problem step by step. End with the final answer on its own "
               "line as 'Answer: <number>'.")


@dataclass
class Prompt:
    prompt: str | list[dict]      # text to continue, or chat messages
    domain: str
    answer: str | None = None     # checkable answer (math), None where there is none
    meta: dict = field(default_factory=dict)


def _documented_functions():
    """(module name, function name, signature, first docstring paragraph) of the
    documented functions of `_CODE_MODULES`, in a fixed order."""
    found = []
    for mod_name in _CODE_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, fn in sorted(vars(mod).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != mod.__name__:
                continue
            doc = inspect.getdoc(fn)
            if not doc or len(doc) < 40:
                continue
            try:
                sig = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            found.append((mod_name, name, fn, sig, doc.split("\n\n")[0].strip()))
    if not found:
        raise RuntimeError("no documented functions found in the standard library")
    return found


def _sample(found: list, count: int, seed: int) -> list:
    found = list(found)
    rng = random.Random(seed)
    rng.shuffle(found)
    return [found[i % len(found)] for i in range(count)]


def code_prompts(count: int, seed: int = 0) -> list[Prompt]:
    """Function-completion prompts: a stdlib function's signature and docstring."""
    out = []
    for mod_name, name, _fn, sig, first in _documented_functions():
        body = "\n    ".join(first.splitlines())
        text = f"def {name}{sig}:\n    \"\"\"{body}\n    \"\"\"\n"
        out.append(Prompt(text, "code", None, {"module": mod_name, "function": name}))
    return _sample(out, count, seed)


def _js_params(fn) -> list[str]:
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            params.append(f"...{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            params.append("options = {}")
        else:
            params.append(p.name)
    return params


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def javascript_prompts(count: int, seed: int = 0) -> list[Prompt]:
    """The same tasks as `code_prompts`, to be written in JavaScript: a JSDoc comment and
    the function's header. A language the bundled static drafters were never distilled
    on (GSM8K and HumanEval: Python and arithmetic prose), so a drift into it shows
    what a frozen drafter loses on prompts it has not seen."""
    out = []
    for mod_name, name, fn, _sig, first in _documented_functions():
        try:
            params = _js_params(fn)
        except (TypeError, ValueError):
            continue
        doc = "\n".join(f" * {line}".rstrip() for line in first.splitlines())
        text = f"/**\n{doc}\n */\nfunction {_camel(name)}({', '.join(params)}) {{\n"
        out.append(Prompt(text, "javascript", None, {"module": mod_name, "function": name}))
    return _sample(out, count, seed)


_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade",
          "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya")
_TEMPLATES = (
    ("{n} has {a} apples. {n} buys {b} bags with {c} apples in each bag. How many apples "
     "does {n} have now?", lambda a, b, c: a + b * c),
    ("A shop sells pencils at {c} dollars each. {n} buys {b} pencils and pays with a "
     "{a}-dollar bill. How many dollars of change does {n} get?",
     lambda a, b, c: a - b * c),
    ("{n} reads {c} pages every day for {b} days, then reads {a} more pages. How many "
     "pages did {n} read in total?", lambda a, b, c: b * c + a),
    ("A farm has {a} cows. Each cow gives {c} liters of milk a day. How many liters do "
     "the cows give in {b} days?", lambda a, b, c: a * b * c),
    ("{n} had {a} stickers and gave {b} stickers to each of {c} friends. How many "
     "stickers does {n} have left?", lambda a, b, c: a - b * c),
    ("A train travels {c} kilometers per hour for {b} hours, then {a} more kilometers. "
     "How far did it travel?", lambda a, b, c: b * c + a),
)


def math_prompts(count: int, seed: int = 0) -> list[Prompt]:
    """Arithmetic word problems as chat messages, with their answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        template, answer = rng.choice(_TEMPLATES)
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        a = b * c + rng.randint(5, 60)  # keeps subtraction answers positive
        question = template.format(n=rng.choice(_NAMES), a=a, b=b, c=c)
        messages = [{"role": "system", "content": MATH_SYSTEM},
                    {"role": "user", "content": question}]
        out.append(Prompt(messages, "math", str(answer(a, b, c)), {"question": question}))
    return out


# Languages `code_language_prompts` asks for: not JavaScript (the benchmark's unseen
# domain) and not Python (`code_prompts`).
CODE_LANGUAGES = ("C", "Go", "Rust", "Java", "Ruby", "C++", "Bash", "SQL")


def _language_tasks(languages) -> list[Prompt]:
    out = []
    for mod_name, name, _fn, _sig, first in _documented_functions():
        task = " ".join(first.split())
        for lang in languages:
            messages = [{"role": "user", "content": f"Write a {lang} function named `{name}`. "
                                                    f"What it does: {task}"}]
            out.append(Prompt(messages, "code-" + lang.lower(), None,
                              {"module": mod_name, "function": name, "language": lang}))
    return out


def code_language_prompts(count: int, seed: int = 0) -> list[Prompt]:
    """The stdlib tasks of `code_prompts` as chat requests for a function in another
    language: every task in every one of `CODE_LANGUAGES`, drawn by the seed."""
    return _sample(_language_tasks(CODE_LANGUAGES), count, seed)


def language_prompts(language: str, count: int, seed: int = 0) -> list[Prompt]:
    """The stdlib tasks of `code_prompts` as chat requests for a function in one
    programming language (any name: "PHP", "Lua", "Haskell"), domain ``code-<language>``
    in lower case; one prompt per documented function, repeated past their number."""
    if not language.strip():
        raise ValueError("a programming language's name is empty: write e.g. code-php")
    return _sample(_language_tasks((language,)), count, seed)


#: Display names of the languages `domain_prompts` knows by their lower-case domain name;
#: any other ``code-<name>`` is asked for as written.
_LANGUAGE_NAMES = {lang.lower(): lang for lang in (*CODE_LANGUAGES, "PHP", "Lua", "Haskell",
                                                   "Kotlin", "Swift", "Perl", "Julia", "Scala",
                                                   "TypeScript", "C#", "R")}


def domain_prompts(domain: str, count: int, seed: int = 0) -> list[Prompt]:
    """The prompts of one named domain: ``code`` (Python), ``javascript``, ``math``,
    ``instructions``, or ``code-<language>`` (a chat request for a function in that
    language, e.g. ``code-php``)."""
    makers = {"code": code_prompts, "javascript": javascript_prompts, "math": math_prompts,
              "instructions": instruction_prompts}
    if domain in makers:
        return makers[domain](count, seed)
    if domain.startswith("code-") and len(domain) > len("code-"):
        name = domain[len("code-"):]
        return language_prompts(_LANGUAGE_NAMES.get(name, name), count, seed)
    raise ValueError(f"unknown domain {domain!r}: choose code, javascript, math, "
                     f"instructions or code-<language> (e.g. code-php, code-lua)")


_TOPICS = ("photosynthesis", "the water cycle", "black holes", "compound interest", "the French "
           "Revolution", "vaccines", "machine learning", "plate tectonics", "the stock market",
           "sleep", "coffee", "the Roman Empire", "electric cars", "volcanoes", "recycling",
           "the immune system", "jazz", "chess", "honeybees", "the internet", "climate change",
           "gravity", "democracy", "bread baking", "the Moon", "antibiotics", "rainbows",
           "inflation", "friendship", "public libraries", "solar panels", "octopuses")
_AUDIENCES = ("a ten-year-old", "a busy manager", "a first-year student", "my grandmother",
              "an expert")
_INSTRUCTIONS = (
    "Explain {t} to {a} in one short paragraph.",
    "Give three practical tips about {t}.",
    "Write a short poem about {t}.",
    "What are the main pros and cons of {t}?",
    "Summarize what everyone should know about {t} in five bullet points.",
    "Write a friendly email inviting a colleague to a talk about {t}.",
    "Tell a short story in which {t} plays a part.",
    "What is a common misconception about {t}, and what is the truth?",
    "Write a tweet about {t}.",
    "Compare {t} and {u} in a few sentences.",
    "I am giving a presentation on {t} to {a}. Suggest an outline.",
    "Write three quiz questions about {t}, with answers.",
)


def instruction_prompts(count: int, seed: int = 0) -> list[Prompt]:
    """General instructions and chat requests (explain, list, write, compare) over
    everyday topics, as chat messages: the chat side of a broad prompt mix. Every
    (instruction, topic, second topic or audience) combination, drawn by the seed."""
    out = []
    for template in _INSTRUCTIONS:
        for t in _TOPICS:
            seconds = [u for u in _TOPICS if u != t] if "{u}" in template else [None]
            audiences = _AUDIENCES if "{a}" in template else (None,)
            for u in seconds:
                for a in audiences:
                    out.append(Prompt([{"role": "user", "content": template.format(t=t, u=u, a=a)}],
                                      "instructions"))
    return _sample(out, count, seed)


_ANSWER = re.compile(r"answer\s*[:=]?\s*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The number after the last 'Answer:' (else the last number in the text)."""
    matches = _ANSWER.findall(text)
    if not matches:
        matches = re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def mixed_prompts(count: int, seed: int = 0) -> list[Prompt]:
    """Half code, half math, interleaved."""
    code = code_prompts((count + 1) // 2, seed)
    math = math_prompts(count // 2, seed)
    return [p for pair in zip(code, math) for p in pair] + code[len(math):]


def _gsm8k_answer(answer) -> str | None:
    """GSM8K writes the final answer after '####'; other sets give it bare."""
    if answer is None:
        return None
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip().replace(",", "")
    return text or None


def load_prompt_file(path: str, domain: str | None = None) -> list[Prompt]:
    """Prompts from a JSONL file (optionally .gz), one object per line with one of:
    - ``messages``: chat messages, used as given;
    - ``question``: a chat question (the math system prompt is added when the line has
      an ``answer``, so that answers come as 'Answer: <number>');
    - ``prompt``: text to continue (e.g. HumanEval's function stubs).
    An ``answer`` field (GSM8K's '#### 42' form or a bare value) makes the prompt
    checkable; without one, rewards fall back to format and length."""
    import gzip
    import json
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    domain = domain or os.path.basename(path).split(".")[0]
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); each line must be "
                                 f"one JSON object") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            try:
                out.append(prompt_from_row(row, domain))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return out


def prompt_from_row(row: dict, domain: str) -> Prompt:
    """One dataset row (JSONL line or hub dataset row) as a Prompt: see load_prompt_file."""
    answer = _gsm8k_answer(row.get("answer"))
    if isinstance(row.get("messages"), list) and row["messages"]:
        prompt = row["messages"]
    elif isinstance(row.get("question"), str) and row["question"].strip():
        prompt = ([{"role": "system", "content": MATH_SYSTEM}] if answer else []) + \
            [{"role": "user", "content": row["question"]}]
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        prompt = row["prompt"]
    else:
        raise ValueError(f"no prompt: give each line a non-empty 'prompt' (text), 'question' "
                         f"(chat) or 'messages' field (found: {', '.join(sorted(row)) or 'nothing'})")
    meta = {k: row[k] for k in ("task_id", "id") if k in row}
    return Prompt(prompt, domain, answer, meta)


def load_hub_dataset(spec: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from a Hugging Face hub dataset: 'NAME[:CONFIG][@SPLIT]', e.g.
    'openai/gsm8k:main@train' (needs network or the datasets cache)."""
    from datasets import load_dataset

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    ds = load_dataset(name, config or None, split=split or "train")
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    domain = name.rsplit("/", 1)[-1]
    return [prompt_from_row(dict(r), domain) for r in rows]


# The prompt sets `builtin_prompts` builds, by name.
BUILTIN_SETS = {"code": code_prompts, "code-languages": code_language_prompts,
                "javascript": javascript_prompts, "math": math_prompts,
                "instructions": instruction_prompts, "mixed": mixed_prompts}


def builtin_prompts(spec: str, seed: int = 0) -> list[Prompt]:
    """'builtin:NAME[:COUNT]' (NAME from `BUILTIN_SETS`; COUNT default 1000; the code sets
    repeat their tasks past the number of documented stdlib functions)."""
    _, _, rest = spec.partition(":")
    name, _, count = rest.partition(":")
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown prompt set {spec!r}: builtin:NAME[:COUNT] with NAME one of "
                         f"{', '.join(BUILTIN_SETS)}")
    try:
        n = int(count) if count else 1000
    except ValueError:
        raise ValueError(f"{spec!r}: COUNT must be a whole number, got {count!r}") from None
    if n < 1:
        raise ValueError(f"{spec!r}: COUNT must be >= 1")
    return BUILTIN_SETS[name](n, seed)
