"""The docs say what runs: the README's and the docs' code blocks marked runnable run
(`<!-- runnable: quick -->` here, `<!-- runnable: slow -->` in the slow set, both in
`make test`), every shell and Python block parses, every `make` target named exists, the
generated references are what the code says, and the site builds strict."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = re.compile(r"^<!-- runnable: (quick|slow) -->\s*$")
FENCE = re.compile(r"^```(\w*)")


def blocks(path: Path):
    """(language, code, 'quick' | 'slow' | None, line) of every fenced block of `path`."""
    lines = path.read_text().splitlines()
    out, i, mark = [], 0, None
    while i < len(lines):
        found = MARK.match(lines[i])
        if found:
            mark = found.group(1)
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if fence:
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((fence.group(1), "\n".join(body) + "\n", mark, start + 1))
            mark = None
        elif lines[i].strip():
            mark = None  # a mark applies to the block right below it
        i += 1
    return out


def _runnable(kind: str):
    return [pytest.param(lang, code, id=f"{path.relative_to(ROOT)}:{line}")
            for path in PAGES for lang, code, mark, line in blocks(path) if mark == kind]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _run(lang: str, code: str, tmp_path: Path, timeout: int) -> None:
    if lang == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        assert lang in ("bash", "sh"), f"a runnable block must be bash or python, got {lang!r}"
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (code, done.stdout[-3000:], done.stderr[-3000:])


def test_the_pages_mark_what_runs():
    assert len(_runnable("quick")) >= 2 and len(_runnable("slow")) >= 2
    readme = [mark for _, _, mark, _ in blocks(ROOT / "README.md") if mark]
    assert "quick" in readme and "slow" in readme


@pytest.mark.parametrize("lang, code", _runnable("quick"))
def test_quick_blocks_run(lang, code, tmp_path):
    _run(lang, code, tmp_path, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("lang, code", _runnable("slow"))
def test_slow_blocks_run(lang, code, tmp_path, real_model_path):
    _run(lang, code, tmp_path, timeout=900)


def test_every_block_parses_and_every_make_target_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    checked = 0
    for path in PAGES:
        for lang, code, _, line in blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if lang == "python":
                compile(code, where, "exec")
            elif lang in ("bash", "sh"):
                done = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
                assert done.returncode == 0, (where, done.stderr)
            else:
                continue
            for target in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", code):
                assert target in targets, f"{where}: no make target {target!r}"
            checked += 1
    assert checked > 20


def _subcommands():
    from atlas_rl import cli

    parser = cli.build_parser()
    found = {}
    for name, sub in _choices(parser).items():
        found[name] = sub
        for inner, subsub in _choices(sub).items():
            found[f"{name} {inner}"] = subsub
    return found


def _choices(parser):
    import argparse

    return next((a.choices for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)), {})


# subcommands whose flags go on to another parser (vLLM's, TRL's; serve's unknown ones to vLLM)
PASS_THROUGH = {"vllm", "grpo", "serve"}


def test_every_atlas_rl_command_in_the_pages_names_real_flags():
    """Each `atlas-rl SUBCOMMAND --flag` in a shell block: the subcommand exists and
    takes the flag (its own parser's, not a guess)."""
    subcommands = _subcommands()
    checked = 0
    for path in PAGES:
        for lang, code, _, line in blocks(path):
            if lang not in ("bash", "sh", ""):
                continue
            for command in re.findall(r"atlas-rl ((?:[^\\\n]|\\\n)+)", code):
                words = command.replace("\\\n", " ").split()
                if not words or words[0].startswith(("-", "<", "$", "(")) or words[0] in PASS_THROUGH:
                    continue
                if not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                    continue
                name = " ".join(words[:2]) if " ".join(words[:2]) in subcommands else words[0]
                where = f"{path.relative_to(ROOT)}:{line}: atlas-rl {name}"
                assert name in subcommands, f"{where}: no such subcommand"
                options = {o for a in subcommands[name]._actions for o in a.option_strings}
                for word in words:
                    if word in ("#", "|", "&&", ";", ">", "2>&1"):
                        break
                    flag = word.split("=", 1)[0]
                    if re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
                        assert flag in options, f"{where}: no flag {flag}"
                checked += 1
    assert checked >= 10, checked


def test_every_atlas_rl_import_in_the_pages_exists():
    """The `from atlas_rl... import NAME` lines of every Python block import."""
    import importlib

    checked = 0
    for path in PAGES:
        for lang, code, _, line in blocks(path):
            if lang != "python":
                continue
            for module, names in re.findall(r"^from (atlas_rl[\w.]*) import ([\w, ]+)$", code, re.M):
                imported = importlib.import_module(module)
                for name in (n.strip().split(" as ")[0] for n in names.split(",")):
                    assert hasattr(imported, name) or importlib.util.find_spec(
                        f"{module}.{name}"), f"{path.relative_to(ROOT)}:{line}: {module}.{name}"
                    checked += 1
    assert checked >= 5, checked


def _build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_references_are_what_the_code_says():
    """docs/reference/ is generated (`make docs` rewrites it): the committed copies must
    equal what the code's own help gives now."""
    from atlas_rl.config import AtlasConfig

    for name, text in _build_docs().references().items():
        committed = (ROOT / "docs" / "reference" / name).read_text()
        assert committed == text, f"docs/reference/{name} is stale: run `make docs` and commit it"
    config = (ROOT / "docs" / "reference" / "config.md").read_text()
    import dataclasses

    for field in dataclasses.fields(AtlasConfig):
        assert f"| `{field.name}` |" in config
    assert "--policy-lora-rank" in (ROOT / "docs" / "reference" / "cli.md").read_text()


def test_the_site_builds_strict_and_a_broken_link_fails_it(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (make setup installs it)")
    build = _build_docs()
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_docs.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (build.SITE / "reference" / "config.html").exists()
    assert (build.SITE / "results.html").exists()
    # the same staged pages with one link to a page that does not exist: strict refuses
    page = build.STAGE / "exactness.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md)\n")
    broken = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "--config-file", str(ROOT / "mkdocs.yml"),
                             "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stdout + broken.stderr
