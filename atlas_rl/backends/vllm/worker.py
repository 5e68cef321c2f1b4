"""atlas-rl inside a vLLM worker that stock vLLM started (``vllm serve``, ``vllm.LLM``
with multiprocessing, Ray workers): the proposer sets itself up from the atlas fields of
the speculative config (the plugin moved them into ``additional_config["atlas_rl"]``),
learns from what it generated without help from the client, and keeps its state in a
directory if one was named.

- *Setup* (`setup_in_worker`, called when the runner has loaded the model): the
  speculators and controller of `atlas_rl.speculation`, the CPU workarounds and the
  atlas hooks on this runner, the state directory's speculators if it holds any (a
  state from another model, or one that does not load, stops the worker: a server does
  not start half-configured).
- *Learning in idle time* (`IdleLearner`, ``learn_when_idle``, the default with one
  rank): once the engine has run no step for `IDLE_LEARN_SECONDS`, a daemon thread
  learns the completed sequences (with the ones vLLM reported finished in its last,
  non-proposing flush step), a full update (no time budget: the engine has nothing else
  to do). The next engine step stops it: the step waits for the learner's current
  optimizer step (tens of milliseconds) and runs alone on the CPU, what was trained by
  then is published, and the rest is trained in the next gap. A server with gaps between
  waves of requests (a rollout server while its trainer trains, most real traffic) then
  learns for free.
- *Learning in the step* (`WorkerSpeculation.on_step`, where a step proposes): the
  completed sequences (prompt + output, collected by the proposer) are learnt once
  ``learn_every`` of them are waiting (``learn_every x DEFER_UPDATES`` while the idle
  learner is on: they wait for a gap, and a server that never idles still learns), or,
  without the idle learner, when a new wave of requests starts after the engine ran dry;
  the budget is the engine's rule (`speculation.learn_update`: ``train_budget_fraction``
  of the generation time since the last learn where drafting could pay, nothing for a
  drafter that is not drafting), spent inside that step (the step waits: the cost is
  bounded by the budget, and the metrics show it).
- *State*: saved after every learn that changed something and on `save`, written beside
  and swapped in (`speculation.save_state`), so a crash mid-save leaves the previous
  state loadable.

Every TP rank runs the same setup on the same config, sees the same sampled tokens (vLLM
broadcasts them) and the same hidden states (all-reduced), and learns the same
sequences in the same order with the same seeds: their drafters stay identical without
communication. Timed budgets are the one source of divergence (a rank could fit one more
optimizer step), so with tensor parallelism learning takes no clock: one pass over the
new sequences. (They must stay identical: vLLM's scheduler takes rank 0's draft tokens,
but every rank verifies them against its own draft distribution q.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from atlas_rl import compat
from atlas_rl import speculation as speculation_room
from atlas_rl.config import AtlasConfig

logger = logging.getLogger(__name__)

ADDITIONAL_CONFIG_KEY = "atlas_rl"
IDLE_SECONDS = 1.0  # a gap between engine steps this long: the engine ran dry
#: A gap this long lets the idle learner start: steps follow each other within
#: milliseconds while requests run, and a learner started in a gap that was not one
#: costs the next step one optimizer step's wait.
IDLE_LEARN_SECONDS = 0.25
#: With the idle learner on, an update in the step waits until this many updates' worth
#: of completed sequences (``learn_every`` each) are waiting: they are learnt in the next
#: gap for free, unless the traffic never leaves one.
DEFER_UPDATES = 8
SERVING_FIELDS = {
    "speculation": "'atlas' (learns online, the default) or 'atlas-static' (frozen)",
    "state_dir": "a directory to load the speculators from at start and save them to",
    "learn_every": "learn in a step once this many completed sequences wait (default 16; "
                   "x DEFER_UPDATES while the idle learner is on)",
    "auto_learn": "learn in the worker when due (default true; false: only when asked, "
                  "e.g. by AtlasRolloutEngine.update through collective_rpc)",
    "learn_when_idle": "learn while the engine is idle, stopping at its next step (default "
                       "true; one rank only; false: only in the steps, by the budget rule)",
    "metrics_file": "where the worker writes its counters for /metrics (set by the plugin)",
}


def parse_atlas_fields(values, where: str = "speculative config 'atlas'") -> dict:
    """The atlas fields of a speculative config, checked: the serving fields above and
    any AtlasConfig field. Returns {"speculation", "state_dir", "learn_every",
    "config": AtlasConfig.to_dict()}."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__} "
                         f"{values!r}")
    values = dict(values)
    speculation = values.pop("speculation", "atlas")
    if speculation not in ("atlas", "atlas-static"):
        raise ValueError(f"{where}: field 'speculation' must be 'atlas' or 'atlas-static', "
                         f"got {speculation!r}")
    state_dir = values.pop("state_dir", None)
    if state_dir is not None and not isinstance(state_dir, str):
        raise ValueError(f"{where}: field 'state_dir' must be a path string, got "
                         f"{type(state_dir).__name__} {state_dir!r}")
    learn_every = values.pop("learn_every", 16)
    if isinstance(learn_every, bool) or not isinstance(learn_every, int) or learn_every < 1:
        raise ValueError(f"{where}: field 'learn_every' must be an integer >= 1, got "
                         f"{learn_every!r}")
    auto_learn = values.pop("auto_learn", True)
    if not isinstance(auto_learn, bool):
        raise ValueError(f"{where}: field 'auto_learn' must be true or false, got {auto_learn!r}")
    learn_when_idle = values.pop("learn_when_idle", True)
    if not isinstance(learn_when_idle, bool):
        raise ValueError(f"{where}: field 'learn_when_idle' must be true or false, got "
                         f"{learn_when_idle!r}")
    metrics_file = values.pop("metrics_file", None)
    if metrics_file is not None and not isinstance(metrics_file, str):
        raise ValueError(f"{where}: field 'metrics_file' must be a path string, got "
                         f"{metrics_file!r}")
    try:
        config = AtlasConfig.from_dict(values, where)
    except ValueError as e:
        if "unknown field" in str(e):
            raise ValueError(f"{e}; serving fields: {', '.join(SERVING_FIELDS)}") from None
        raise
    return {"speculation": speculation, "state_dir": state_dir, "learn_every": learn_every,
            "auto_learn": auto_learn, "learn_when_idle": learn_when_idle,
            "metrics_file": metrics_file, "config": config.to_dict()}


class WorkerSpeculation:
    """What the client-side engine does for an in-process proposer, done in the worker."""

    def __init__(self, proposer, fields: dict, model_path: str, tp_size: int = 1):
        self.proposer = proposer
        self.speculation = fields["speculation"]
        self.config = AtlasConfig.from_dict(fields["config"])
        self.state_dir = fields.get("state_dir")
        self.learn_every = int(fields.get("learn_every", 16))
        self.auto_learn = bool(fields.get("auto_learn", True))
        self.learn_when_idle = bool(fields.get("learn_when_idle", True))
        self.model_path = model_path
        self.tp_size = tp_size
        self.learns = 0
        self.update_errors = 0
        self.restored = False  # loaded from state_dir at start
        # the last saved or loaded state's digest, as a 52-bit integer (a /metrics gauge)
        self.fingerprint: int | None = None
        self.last_update: dict = {}
        self.update_seconds = 0.0
        self.sampler = None  # the runner's AtlasRejectionSampler (its NaN counters)
        self._generation_seconds = 0.0
        self._last_step: float | None = None
        self._learn_counters = None  # the proposer's counters at the last learn
        # learning while the engine is idle (`IdleLearner`, started by `setup_in_worker`
        # once the runner's steps are marked)
        self.idle: IdleLearner | None = None
        self.metrics = None  # last: its thread reads the fields above
        if fields.get("metrics_file"):
            from atlas_rl.backends.vllm.server_metrics import SnapshotWriter

            self.metrics = SnapshotWriter(fields["metrics_file"], proposer, self)

    @property
    def learning(self) -> bool:
        return self.speculation == "atlas"

    @property
    def wants_idle_learning(self) -> bool:
        """One rank only (a timed or interrupted update is the one thing that could set
        ranks apart), and only where the worker learns by itself."""
        return self.learning and self.auto_learn and self.learn_when_idle and self.tp_size == 1

    def paused(self):
        """A context in which the idle learner does not run (the speculators are the
        caller's alone): an RPC that reads or replaces them, a weight update."""
        return self.idle.paused() if self.idle is not None else contextlib.nullcontext()

    def on_step(self, num_live: int) -> None:
        """Called in every engine step that proposes, before drafting: counts generation
        time, learns when due (enough completed sequences, or, without the idle learner,
        the first step after the engine ran dry: a new wave of requests)."""
        now = time.perf_counter()
        idle = self._last_step is not None and now - self._last_step > IDLE_SECONDS
        if self._last_step is not None and not idle:
            self._generation_seconds += now - self._last_step
        self._last_step = now
        waiting = len(self.proposer.completed)
        due = waiting >= self.learn_every * (DEFER_UPDATES if self.idle is not None else 1)
        if self.auto_learn and self.learning and waiting and (
                due or (idle and self.idle is None)):
            try:
                self.learn()
            except Exception as e:  # noqa: BLE001 (an update never stops generation)
                self.update_failed(e)
            self._last_step = time.perf_counter()

    def update_failed(self, e: Exception) -> None:
        """An online update raised: counted (``update_errors``), logged the first time;
        drafting goes on with the published speculators."""
        self.update_errors += 1
        if self.update_errors == 1:
            logger.warning("atlas-rl: the online update failed (%s: %s); drafting goes on "
                           "with the published speculators. Later failures are counted "
                           "(update_errors), not logged.", type(e).__name__, e)

    def learn(self, budget: float | None = None, stop=None, resume: bool = False) -> dict:
        """Learn the completed sequences now (budget in seconds; default the configured
        share of the generation time since the last learn). `stop` (the idle learner's):
        a full update, no budget and no rule (the engine is idle: it costs nothing),
        ended early once `stop` is set; `resume`: even with no new sequence (the last
        idle update was cut short: its rows wait in the drafter's buffer)."""
        sequences = self.proposer.take_completed()
        if not (sequences or (resume and stop is not None)) or not self.learning:
            return {}
        now = self.proposer.counters.copy()
        since = now if self._learn_counters is None else now.since(self._learn_counters)
        self._learn_counters = now
        seconds, self._generation_seconds = self._generation_seconds, 0.0
        import torch

        # inside an engine step vLLM runs under inference mode; training needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            if stop is not None:
                out = speculation_room.learn_all(self.proposer.speculators, sequences, None,
                                                 stop=stop)
            elif budget is None and self.tp_size == 1:  # the engine's rule (`learn_update`)
                out = speculation_room.learn_update(
                    self.config, self.proposer.speculators, sequences, seconds,
                    since if since.request_steps > 0 else None,
                    getattr(self.proposer.controller, "drafting_could_pay", None))
            else:  # an explicit budget; or tensor parallelism: no clock (budget None =
                # one pass over the new sequences), so every rank takes the same steps
                out = speculation_room.learn_all(self.proposer.speculators, sequences, budget)
        self.learns += 1
        self.update_seconds += out.get("update_seconds", 0.0)
        if stop is not None:
            out["idle_update"] = 1.0
        self.last_update = {k: v for k, v in out.items() if isinstance(v, (int, float))}
        if self.state_dir:
            self.save(self.state_dir)
        if self.metrics is not None:
            self.metrics.write()
        return self.last_update

    def save(self, directory) -> None:
        speculation_room.save_state(directory, self.speculation, self.config,
                                    self.proposer.speculators, self.proposer.controller,
                                    extra={"model": self.model_path,
                                           "published_version": self.published_version()})
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> int:
        return int(speculation_room.state_digest(self.proposer.speculators)[:13], 16)

    def load(self, directory) -> dict:
        state = speculation_room.read_state(directory)
        check_state_for_model(state, self.model_path, directory)
        out = speculation_room.load_state(directory, self.proposer.speculators,
                                          self.proposer.controller)
        self.fingerprint = self._fingerprint()
        return out

    def published_version(self) -> int:
        neural = self.proposer.speculators.get("neural")
        return int(getattr(neural, "version", 0) or 0)


class IdleLearner:
    """Learns while the engine is idle, from a daemon thread, and never while it steps.

    The engine marks each step (`step_begins` where vLLM's runner starts one, before its
    forward; `step_ends` where it has returned its output): a step waits at its start
    for the learner's current optimizer step (`stop` is checked before each one) and
    runs alone. Once no step has run for `IDLE_LEARN_SECONDS`, the learner learns the
    completed sequences and those of the requests vLLM reported finished in its last
    step (`AtlasProposer.finish_noted`): a full update (`WorkerSpeculation.learn` with
    `stop`), published as far as it got if a step stopped it; the rows it did not reach
    are trained in the next gap. RPCs that read or replace the speculators, and weight
    updates, run inside `paused`; vLLM asleep holds it (`hold`)."""

    POLL_SECONDS = 0.1

    def __init__(self, work: WorkerSpeculation):
        self.work = work
        self.lock = threading.Lock()   # held while learning; a step takes it to start
        self.stop = threading.Event()  # set: the learner ends at its next optimizer step
        self.stepping = False          # between `step_begins` and `step_ends`
        self.held = False              # `hold`: vLLM is asleep
        self.last_active = time.perf_counter()
        self.learning = False
        self.updates = 0     # idle updates, and of them the ones a step cut short
        self.stopped = 0
        self.seconds = 0.0
        self._resume = False  # the last update was cut short: train on in the next gap
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the learner's thread (once the engine's steps are marked)."""
        self._thread = threading.Thread(target=self._loop, name="atlas-rl-idle-learner",
                                        daemon=True)
        self._thread.start()

    # --- the engine's side ---------------------------------------------------------------

    def step_begins(self) -> None:
        self.stepping = True
        self.last_active = time.perf_counter()
        self.stop.set()  # always: the learner may be about to start
        with self.lock:  # the learner's current optimizer step ends first
            self.stop.clear()

    def step_ends(self) -> None:
        self.stepping = False
        self.last_active = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self.stop.set()
        with self.lock:
            self.stop.clear()
            yield
        self.last_active = time.perf_counter()

    def hold(self, on: bool) -> None:
        """No idle learning while `on` (vLLM asleep: the weights it reads may be gone)."""
        with self.paused():
            self.held = on

    # --- the learner's side ----------------------------------------------------------

    def waiting(self) -> int:
        """Sequences that an idle update would learn: completed, or of requests vLLM
        reported finished in a step that did not propose."""
        proposer = self.work.proposer
        return len(proposer.completed) + proposer.noted_sequences()

    def pending(self) -> int:
        """What the next idle moment will learn: the waiting sequences, plus one where
        the last idle update was cut short (it trains on where it stopped)."""
        return self.waiting() + int(self._resume)

    def _idle(self) -> bool:
        return (not self.stepping and not self.held
                and time.perf_counter() - self.last_active >= IDLE_LEARN_SECONDS)

    def _loop(self) -> None:
        while True:
            time.sleep(self.POLL_SECONDS)
            if not self._idle() or not self.pending():
                continue
            with self.lock:
                if not self._idle() or self.stop.is_set():
                    continue  # a step began meanwhile
                self.learning = True
                start = time.perf_counter()
                try:
                    self.work.proposer.finish_noted()
                    out = self.work.learn(stop=self.stop, resume=self._resume)
                    cut = bool(out) and self.stop.is_set()
                    self.updates += bool(out)
                    self.stopped += cut
                    self._resume = cut
                except Exception as e:  # noqa: BLE001 (never into vLLM; serving goes on)
                    self._resume = False  # not retried: its sequences are gone
                    self.work.update_failed(e)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.learning = False


def attach_step_marks(runner, idle: IdleLearner) -> bool:
    """Mark where the runner's steps begin and end for `idle` (hook ``idle_learning``):
    ``execute_model`` begins a step; it ends where ``execute_model`` returns an output,
    or, where it returns None (vLLM then samples in ``sample_tokens``), where
    ``sample_tokens`` returns."""
    from atlas_rl.backends.vllm import hooks

    execute, sample = getattr(runner, "execute_model", None), getattr(runner, "sample_tokens",
                                                                      None)
    if execute is None:
        hooks.record("idle_learning", "not applied: the runner has no execute_model; the "
                                      "worker learns in its steps only")
        return False

    def execute_model(*args, **kwargs):
        idle.step_begins()
        try:
            out = execute(*args, **kwargs)
        except BaseException:
            idle.step_ends()
            raise
        if out is not None or sample is None:
            idle.step_ends()
        return out

    hooks.patch(runner, "execute_model", execute_model, key="idle_learning")
    if sample is not None:
        def sample_tokens(*args, **kwargs):
            try:
                return sample(*args, **kwargs)
            finally:
                idle.step_ends()

        hooks.patch(runner, "sample_tokens", sample_tokens, key="idle_learning")
    hooks.record("idle_learning", "applied")
    return True


_CURRENT: dict = {"proposer": None}


def learning_paused():
    """The idle learner of this process's proposer paused (a context; nothing to pause
    where there is none): for what replaces the policy's weights or the speculators."""
    proposer = _CURRENT["proposer"]
    work = getattr(proposer, "worker", None)
    return work.paused() if work is not None else contextlib.nullcontext()


def current_proposer():
    """The atlas proposer set up in this worker process (None outside one): what the
    weight-transfer engine tells when the policy's weights change."""
    return _CURRENT["proposer"]


def check_state_for_model(state: dict, model_path: str, directory) -> None:
    saved = state.get("model")
    if saved is not None and Path(str(saved)).name != Path(str(model_path)).name:
        raise ValueError(f"the atlas-rl state in {str(directory)!r} was saved for model "
                         f"{saved!r}, not {model_path!r}: point state_dir at that model's "
                         f"state, or at an empty directory to start afresh")


def setup_in_worker(runner, proposer) -> bool:
    """Set up `proposer` (vLLM's instance, in this worker) from the config's atlas fields;
    False when the config has none (an in-process `AtlasRolloutEngine` attaches its own
    speculators after the build)."""
    from atlas_rl.backends.vllm.proposer import install_atlas

    vllm_config = runner.vllm_config
    extra = getattr(vllm_config, "additional_config", None) or {}
    fields = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, dict) else None
    if not fields or proposer.controller is not None:
        return False
    model_path = str(vllm_config.model_config.model)
    tp = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
    work = WorkerSpeculation(proposer, fields, model_path, tp)
    speculators = speculation_room.build_speculators(
        work.config, model_path, static=work.speculation == "atlas-static")
    proposer.attach(speculators, speculation_room.build_controller(work.config, speculators))
    proposer.track_completed()
    proposer.worker = work
    _CURRENT["proposer"] = proposer
    compat.install_vllm_fixes()
    compat.install_vllm_fixes_after_build(None)
    install_atlas(runner, proposer, work.config.verifier)
    work.sampler = getattr(runner, "rejection_sampler", None)
    _log_where_vllm_logs()
    if work.state_dir and (Path(work.state_dir) / speculation_room.STATE_FILE).is_file():
        work.load(work.state_dir)  # raises on another model's or a broken state
        work.restored = True
        logger.info("atlas-rl: speculators restored from %s (published version %d)",
                    work.state_dir, work.published_version())
    if work.wants_idle_learning:  # last: its thread may touch the speculators from now on
        idle = IdleLearner(work)
        if attach_step_marks(runner, idle):
            work.idle = idle
            idle.start()
    logger.info("atlas-rl: speculating in this worker (%s; speculators %s; learning %s)",
                work.speculation, ", ".join(speculators),
                "in idle time" if work.idle is not None else "never (frozen)"
                if not work.learning else "in the steps" if work.auto_learn else "when asked")
    return True


def _log_where_vllm_logs() -> None:
    """A server's log shows atlas-rl's INFO lines (set-up, restored state) the way it
    shows vLLM's, unless the process configured logging itself."""
    log = logging.getLogger("atlas_rl")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("(atlas-rl) %(levelname)s %(asctime)s %(message)s",
                                           "%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
