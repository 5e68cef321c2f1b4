"""Build the docs site (`make docs`): mkdocs with the material theme, strict.

The pages live where a reader of the repository finds them (README.md, BENCHMARKS.md,
docs/); this script stages them into build/docs-src for mkdocs, with what the code
itself says generated beside them so that it cannot drift from the code:

- index.md: README.md; results.md: BENCHMARKS.md (their links rewritten for the site);
- reference/config.md: every `AtlasConfig` field, its type, default and help;
- reference/cli.md: `atlas-rl` and every subcommand's ``--help``, `atlas-rl serve`'s flags.

The two references are also written into docs/reference/ (a reader of the repository
finds them there); tests/test_docs.py fails when those copies differ from the code.

Then ``mkdocs build --strict`` (mkdocs.yml): a warning fails the build, a link to a page
or an anchor that does not exist included. Offline: nothing is fetched at build time.

    python scripts/build_docs.py             # build/site/index.html
    python scripts/build_docs.py --stage-only
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
import typing
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "build" / "docs-src"
SITE = ROOT / "build" / "site"

# Links as a reader of the repository follows them -> the same target on the site.
_REPO_LINKS = [(re.compile(r"\]\(docs/"), "]("),
               (re.compile(r"\]\(BENCHMARKS\.md"), "](results.md"),
               (re.compile(r"\]\(README\.md"), "](index.md")]
_DOCS_LINKS = [(re.compile(r"\]\(\.\./BENCHMARKS\.md"), "](results.md"),
               (re.compile(r"\]\(\.\./examples/"), "](examples/"),
               (re.compile(r"\]\(\.\./README\.md"), "](index.md")]
_NESTED_LINKS = [(re.compile(r"\]\(\.\./\.\./BENCHMARKS\.md"), "](../results.md"),
                 (re.compile(r"\]\(\.\./\.\./README\.md"), "](../index.md")]


def rewrite(text: str, rules) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    from atlas_rl.config import AtlasConfig

    hints = typing.get_type_hints(AtlasConfig)
    rows = []
    for f in dataclasses.fields(AtlasConfig):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append(f"| `{f.name}` | `{_cell(_type_name(hints.get(f.name, f.type)))}` | "
                    f"`{_cell(default)}` | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join([
        "# `AtlasConfig` reference",
        "",
        "Generated from `atlas_rl/config.py` at build time (`scripts/build_docs.py`): every "
        "field, its type, default and help, as `HfArgumentParser` and `atlas-rl grpo` "
        "(prefixed `atlas_`) see them. In Python: "
        "`AtlasConfig(max_lookahead=4, ...)`; from JSON: `AtlasConfig.from_dict(...)`; in a "
        "vLLM speculative config: the fields under `\"atlas\"` "
        "(`atlas-rl speculative-config --set FIELD=VALUE`).",
        "",
        "| field | type | default | help |",
        "|---|---|---|---|",
        *rows,
        ""])


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip()


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps them nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fixed for the pages
    from atlas_rl import cli
    from atlas_rl.backends.vllm import serve

    parser = cli.build_parser()
    out = ["# Command-line reference", "",
           "Generated from the parsers themselves at build time (`scripts/build_docs.py`): "
           "what `--help` prints. `atlas-rl grpo --help` is TRL's parser with `GRPOConfig`, "
           "`ModelConfig` and `AtlasConfig` (prefixed `atlas_`; [AtlasConfig](config.md)); "
           "`atlas-rl vllm ARGS` is vLLM's own command line.", "",
           "## `atlas-rl`", "", "```text", _help(parser), "```", ""]
    for name, sub in _subparsers(parser).items():
        if name == "serve":
            out += [f"## `atlas-rl {name}`", "", "```text", _help(serve.build_parser()),
                    "```", ""]
            continue
        if not sub.add_help:  # handed to another parser (vLLM's, TRL's)
            continue
        out += [f"## `atlas-rl {name}`", "", "```text", _help(sub), "```", ""]
        for inner, subsub in _subparsers(sub).items():
            out += [f"### `atlas-rl {name} {inner}`", "", "```text", _help(subsub), "```", ""]
    return "\n".join(out)


def references() -> dict[str, str]:
    """The generated pages: docs/reference/NAME -> text."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):  # nothing printed at import reaches a page
        return {"config.md": config_reference(), "cli.md": cli_reference()}


def write_references(directory: Path = ROOT / "docs" / "reference") -> list[str]:
    """Write the generated pages where they differ; the names of those written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in references().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(str(path.relative_to(ROOT)))
    return written


def stage() -> Path:
    for path in write_references():
        print(f"docs: {path} regenerated from the code")
    if STAGE.exists():
        shutil.rmtree(STAGE)
    shutil.copytree(ROOT / "docs", STAGE)
    shutil.copytree(ROOT / "examples", STAGE / "examples")  # the scripts the pages link to
    for page in STAGE.rglob("*.md"):
        nested = page.parent != STAGE
        page.write_text(rewrite(page.read_text(), _NESTED_LINKS if nested else _DOCS_LINKS))
    (STAGE / "index.md").write_text(rewrite((ROOT / "README.md").read_text(), _REPO_LINKS))
    (STAGE / "results.md").write_text(rewrite((ROOT / "BENCHMARKS.md").read_text(), _REPO_LINKS))
    return STAGE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the docs site (mkdocs, strict).")
    parser.add_argument("--stage-only", action="store_true",
                        help=f"write the pages into {STAGE.relative_to(ROOT)} and stop")
    args = parser.parse_args(argv)
    stage()
    if args.stage_only:
        print(STAGE)
        return 0
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
           "--config-file", str(ROOT / "mkdocs.yml")]
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # material's banner about its successor
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode == 0:
        print(f"docs: {SITE / 'index.html'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
