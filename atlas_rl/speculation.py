"""The speculation a proposer runs, wherever it lives: in the trainer's process (an
in-process engine, `AtlasRolloutEngine`) or in a vLLM worker that stock vLLM started
(`vllm serve`, `vllm.LLM` with multiprocessing; `backends.vllm.plugin`). One recipe for
both: the speculators `AtlasConfig` asks for, the controller over them, learning within
a time budget, and their state on disk."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from atlas_rl.config import AtlasConfig
from atlas_rl.controller import AtlasController
from atlas_rl.metrics import SpecCounters, drafted_fraction
from atlas_rl.speculators import NeuralSpeculator, SuffixSpeculator
from atlas_rl.speculators.base import Speculator, Stop
from atlas_rl.speculators.eagle3 import Eagle3Speculator, is_eagle3_dir
from atlas_rl.speculators.neural import static_speculator_dir

logger = logging.getLogger(__name__)

STATE_FILE = "atlas_config.json"


def build_speculators(config: AtlasConfig, model_path: str, static: bool) -> dict[str, Speculator]:
    """The suffix index and (unless ``config.neural_drafter`` is off) the neural drafter,
    warm-started from the static drafter directory; frozen when `static`."""
    cfg = config
    specs: dict[str, Speculator] = {
        "suffix": SuffixSpeculator(cfg.ngram_sizes, max_corpus_tokens=cfg.max_corpus_tokens,
                                   frozen=static, seed=cfg.seed,
                                   max_history_tokens=cfg.max_history_tokens,
                                   max_finished_live=cfg.max_finished_live)}
    if not cfg.neural_drafter:
        return specs
    path = static_speculator_dir(cfg.static_speculator, model_path, cfg.drafter)
    # auto: the MLP drafter where the directory has one (the bundled directory has
    # both: on a 2-core CPU the EAGLE-3 one is accepted more but its drafting costs what it
    # saves, BENCHMARKS.md), else an EAGLE-3 one
    if cfg.drafter == "eagle3" or (cfg.drafter == "auto" and path is not None
                                   and is_eagle3_dir(path)
                                   and not (path / "neural.json").is_file()):
        if path is None or not is_eagle3_dir(path):
            raise ValueError(
                f"drafter='eagle3' needs a static EAGLE-3 drafter (a directory with "
                f"eagle3.json), but static_speculator={cfg.static_speculator!r} gives "
                f"{path}: distil one with `python -m atlas_rl.speculators.eagle3_distill "
                f"--model {model_path} --prompts FILE --out DIR`, or use drafter='mlp'")
        # a distilled decoder layer fine-tunes at a third of the MLP drafter's rate
        specs["neural"] = Eagle3Speculator.from_dir(path, frozen=static, seed=cfg.seed,
                                                    lr=cfg.drafter_lr / 3,
                                                    # its gate is the held-out one
                                                    gate=cfg.drafter_publish_gate != "off")
        logger.info("atlas-rl: static EAGLE-3 drafter from %s", path)
        return specs
    neural = NeuralSpeculator(cfg.draft_vocab_size, lr=cfg.drafter_lr, frozen=static,
                              seed=cfg.seed, gate=cfg.drafter_publish_gate,
                              loss=cfg.drafter_loss)
    if path is not None and (path / "neural.json").is_file():
        neural.load(path)
        logger.info("atlas-rl: static drafter from %s", path)
    elif not static:  # said once per engine; quieter where the user asked for none
        (logger.warning if cfg.static_speculator == "auto" else logger.info)(
            "atlas-rl: no static drafter for %r (AtlasConfig.static_speculator=%r): atlas "
            "drafts from the suffix index and its history first, and learns its neural "
            "drafter online from the first batch of rollouts (its draft vocabulary: the "
            "%d tokens sampled most). Expect little speedup in the first steps; make a "
            "static drafter with `atlas-rl train-speculator --model %s --prompts FILE "
            "--out DIR` and pass AtlasConfig(static_speculator=DIR).",
            model_path, cfg.static_speculator, cfg.draft_vocab_size, model_path)
    else:
        logger.warning(
            "atlas-rl: atlas-static without a static drafter for %r (AtlasConfig."
            "static_speculator=%r): drafting from the suffix index only. Train one with "
            "`atlas-rl train-speculator --model %s --prompts FILE --out DIR`.",
            model_path, cfg.static_speculator, model_path)
        return specs
    specs["neural"] = neural
    return specs


def build_controller(config: AtlasConfig, speculators: dict[str, Speculator]) -> AtlasController:
    return AtlasController(
        max_lookahead=config.max_lookahead, speculators=list(speculators),
        explore=config.explore, max_batch_size=config.max_speculation_batch_size,
        always=config.speculate_always, seed=config.seed,
        both_kinds={name: spec.both_kinds_max_batch for name, spec in speculators.items()
                    if spec.drafts_both_kinds})


#: Updates a neural drafter without a static start gets whatever the controller did
#: (`drafter_starting`). One was not enough: on Gemma 3 270M (no drafter of ours) a
#: drafter trained on one batch was too weak for the controller to draft with, so under
#: the drafted-fraction rule it waited four steps before its second update.
STARTING_UPDATES = 8


def drafter_starting(speculators: dict[str, Speculator]) -> bool:
    """The neural drafter is starting: no static drafter and fewer than
    `STARTING_UPDATES` updates published (or no draft vocabulary yet). It learns from
    the first batches whatever the controller did: a drafter too weak to be drafted with
    would otherwise never get better."""
    neural = speculators.get("neural")
    return isinstance(neural, NeuralSpeculator) and (
        neural.vocab is None
        or (neural.version < STARTING_UPDATES and neural.vocab_source != "static"))


def learning_budget(config: AtlasConfig, rollout_seconds: float,
                    since: SpecCounters | None,
                    could_pay: Callable[[int], bool] | None,
                    starting: bool = False) -> tuple[float, dict]:
    """The adaptive drafter's training budget in seconds after `rollout_seconds` of
    rollouts, and what decided it. The rule (``learn_where_drafting_pays``):
    ``train_budget_fraction`` of the rollout time, times the share of the request-steps
    since the last update (the proposer's counters, `since`) that ran at batch sizes
    where a surely accepted draft token pays for its verification (`could_pay`, the
    controller's judgement of a batch size). A better drafter gains nothing where no draft
    can pay, so learning there would cost its budget for nothing; where drafts can pay,
    a drafter accepted little is what is missing, so it gets the whole share (a rule on
    the gain so far would starve exactly the drafter that most needs to learn). No
    counters or no judgement, or a drafter that has not drafted yet (`starting`: no
    static drafter, `drafter_starting`), which must learn from its first batches whatever
    their size: the whole share."""
    cap = config.train_budget_fraction * rollout_seconds
    if (not config.learn_where_drafting_pays or since is None or could_pay is None
            or starting):
        return cap, {}
    weights = [(steps * 2 ** b, could_pay(2 ** b)) for b, steps in enumerate(since.batch_steps)
               if steps]
    total = sum(w for w, _ in weights)
    if total <= 0:
        return cap, {}
    share = sum(w for w, pays in weights if pays) / total
    return cap * share, {"learn_opportunity": share}


def learn_update(config: AtlasConfig, speculators: dict[str, Speculator],
                 sequences: list[list[int]], rollout_seconds: float,
                 since: SpecCounters | None, could_pay: Callable[[int], bool] | None,
                 skip: Sequence[str] = ()) -> dict:
    """One update after `rollout_seconds` of rollouts, as an engine and a server both
    learn: the budget of `learning_budget`, and no training of the neural drafter where
    the controller drafted on under ``learn_min_drafted_fraction`` of the request-steps
    since the last update (`since`) unless it is starting: a drafter that is not drafting
    gains nothing from training, so its update would cost its budget for nothing (what it
    captured waits in its buffer). Returns `learn_all`'s stats with what decided them
    (``learn_opportunity``, ``drafted_fraction``, ``drafter_update_waits``)."""
    drafted = None if since is None else drafted_fraction(since.lookahead_hist,
                                                          since.request_steps)
    starting = drafter_starting(speculators)
    budget, why = learning_budget(config, rollout_seconds, since, could_pay, starting)
    waits = (drafted is not None and drafted < config.learn_min_drafted_fraction
             and not starting)
    if waits:
        skip = (*skip, "neural")
    out = learn_all(speculators, sequences, budget, skip)
    out.update(why)
    if drafted is not None:
        out["drafted_fraction"] = drafted
    if waits and "neural" in speculators:
        out["drafter_update_waits"] = 1.0
    return out


def learn_all(speculators: dict[str, Speculator], sequences: list[list[int]],
              budget: float | None, skip: Sequence[str] = (), stop: Stop | None = None
              ) -> dict:
    """Every speculator learns `sequences` (prompt + completion each) within one time
    budget in seconds: each gets what the ones before it left. None: no clock (each
    learns one pass; deterministic, as tensor-parallel ranks need). A budget of 0: the
    neural drafter does not train (what it captured waits); the suffix index, which
    costs next to nothing, still learns. `stop`: training ends early once it is set (a
    server's idle-time learner)."""
    start = time.perf_counter()
    out = {}
    if budget is not None and budget <= 0:
        skip = (*skip, "neural")
    for name, spec in speculators.items():
        if name not in skip:
            left = None if budget is None else max(0.0, budget - (time.perf_counter() - start))
            # `stop` only where one is given: a speculator of the user's may predate it
            extra = {} if stop is None else {"stop": stop}
            out.update(spec.learn(sequences, time_budget=left, **extra))
        else:
            keep_captured(spec)
    seconds = time.perf_counter() - start
    out["update_seconds"] = seconds
    if budget is not None:
        out["update_budget_seconds"] = budget
    return out


def keep_captured(spec: Speculator) -> None:
    """A learning drafter that skips an update keeps what it captured since the last one
    in its bounded training buffer (learnt at its next update), instead of holding it per
    request or losing it."""
    if getattr(spec, "frozen", True) or not hasattr(spec, "take_captured"):
        return
    rows = spec.take_captured()
    if rows:
        spec.add_captured(rows)


def save_state(directory: str | Path, speculation: str, config: AtlasConfig,
               speculators: dict[str, Speculator], controller: AtlasController | None,
               extra: dict | None = None) -> None:
    """Every speculator's state (safetensors + JSON) and the controller's calibration and
    cost model. The directory is written beside and renamed into place, so a crash
    mid-save leaves the previous state loadable. A directory that also holds files of
    its own is not swapped (they would go with it): the state's files are moved in one
    by one, `STATE_FILE` last."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.saving-{os.getpid()}")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir()
    state = {"speculation": speculation, "config": config.to_dict(),
             "speculators": list(speculators), **(extra or {})}
    if controller is not None:
        state["controller"] = controller.state_dict()
    for spec in speculators.values():
        spec.save(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: marks it complete
    ours = {p.name for p in tmp.iterdir()}
    if directory.exists() and any(p.name not in ours for p in directory.iterdir()):
        for name in sorted(ours - {STATE_FILE}) + [STATE_FILE]:
            os.replace(tmp / name, directory / name)
        tmp.rmdir()
        return
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        _rmtree(old)


class StateError(ValueError):
    """A state directory that cannot be loaded (corrupted, or not what it claims)."""


def read_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no atlas-rl state in {str(directory)!r} (expected "
                                f"{STATE_FILE}): save one with engine.save(dir)")
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise StateError(f"the atlas-rl state in {str(directory)!r} is corrupted ({path.name}: "
                         f"{e}): restore it from a copy, or point at an empty directory to "
                         f"start afresh") from e
    if not isinstance(state, dict):
        raise StateError(f"the atlas-rl state in {str(directory)!r} is corrupted ({path.name} "
                         f"is not a JSON object)")
    return state


def load_state(directory: str | Path, speculators: dict[str, Speculator],
               controller: AtlasController | None) -> dict:
    """Restore what `save_state` wrote; returns its JSON. A file that does not load
    raises `StateError` naming it (the speculators may then be half-loaded: callers
    refuse to start, they do not go on)."""
    state = read_state(directory)
    for name, spec in speculators.items():
        if name in state.get("speculators", [name]):
            try:
                spec.load(directory)
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 (safetensors' errors are their own type)
                raise StateError(f"the atlas-rl state in {str(directory)!r} is corrupted: "
                                 f"speculator {name!r} does not load ({type(e).__name__}: "
                                 f"{e}): restore it from a copy, or point at an empty "
                                 f"directory to start afresh") from e
    if controller is not None and "controller" in state:
        controller.load_state_dict(state["controller"])
    return state


def state_digest(speculators: dict[str, Speculator]) -> str:
    """sha256 of every speculator's state (tensors and metadata, as `save_state` writes
    them): equal digests mean equal speculators."""
    import hashlib

    h = hashlib.sha256()
    for name, spec in sorted(speculators.items()):
        tensors, meta = spec.state()
        h.update(name.encode())
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
