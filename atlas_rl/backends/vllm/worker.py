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
- *Learning* (`WorkerSpeculation.maybe_learn`, at the start of an engine step): the
  completed sequences (prompt + output, collected by the proposer) are learnt once
  ``learn_every`` of them are waiting, or when a new wave of requests starts after the
  engine ran dry; the budget is ``train_budget_fraction`` of the generation time since
  the last learn, spent inside that step (the step waits: the cost is bounded by the
  budget, and the metrics show it).
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

import logging
import time
from pathlib import Path

from atlas_rl import compat
from atlas_rl import speculation as speculation_room
from atlas_rl.config import AtlasConfig

logger = logging.getLogger(__name__)

ADDITIONAL_CONFIG_KEY = "atlas_rl"
IDLE_SECONDS = 1.0  # a gap between engine steps this long: the engine ran dry
SERVING_FIELDS = {
    "speculation": "'atlas' (learns online, the default) or 'atlas-static' (frozen)",
    "state_dir": "a directory to load the speculators from at start and save them to",
    "learn_every": "learn once this many completed sequences wait (default 16)",
    "auto_learn": "learn in the worker when due (default true; false: only when asked, "
                  "e.g. by AtlasRolloutEngine.update through collective_rpc)",
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
            "auto_learn": auto_learn, "metrics_file": metrics_file, "config": config.to_dict()}


class WorkerSpeculation:
    """What the client-side engine does for an in-process proposer, done in the worker."""

    def __init__(self, proposer, fields: dict, model_path: str, tp_size: int = 1):
        self.proposer = proposer
        self.speculation = fields["speculation"]
        self.config = AtlasConfig.from_dict(fields["config"])
        self.state_dir = fields.get("state_dir")
        self.learn_every = int(fields.get("learn_every", 16))
        self.auto_learn = bool(fields.get("auto_learn", True))
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
        self.metrics = None  # last: its thread reads the fields above
        if fields.get("metrics_file"):
            from atlas_rl.backends.vllm.server_metrics import SnapshotWriter

            self.metrics = SnapshotWriter(fields["metrics_file"], proposer, self)

    @property
    def learning(self) -> bool:
        return self.speculation == "atlas"

    def on_step(self, num_live: int) -> None:
        """Called at the start of every engine step: counts generation time, learns
        when due (enough completed sequences, or the first step after the engine ran
        dry: a new wave of requests)."""
        now = time.perf_counter()
        idle = self._last_step is not None and now - self._last_step > IDLE_SECONDS
        if self._last_step is not None and not idle:
            self._generation_seconds += now - self._last_step
        self._last_step = now
        waiting = len(self.proposer.completed)
        if self.auto_learn and self.learning and waiting and (waiting >= self.learn_every
                                                              or idle):
            try:
                self.learn()
            except Exception as e:  # noqa: BLE001 (an update never stops generation)
                self.update_errors += 1
                if self.update_errors == 1:
                    logger.warning("atlas-rl: the online update failed (%s: %s); drafting "
                                   "goes on with the published speculators. Later failures "
                                   "are counted (update_errors), not logged.",
                                   type(e).__name__, e)
            self._last_step = time.perf_counter()

    def learn(self, budget: float | None = None) -> dict:
        """Learn the completed sequences now (budget in seconds; default the configured
        share of the generation time since the last learn)."""
        sequences = self.proposer.take_completed()
        if not sequences or not self.learning:
            return {}
        now = self.proposer.counters.copy()
        since = now if self._learn_counters is None else now.since(self._learn_counters)
        self._learn_counters = now
        seconds, self._generation_seconds = self._generation_seconds, 0.0
        import torch

        # inside an engine step vLLM runs under inference mode; training needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            if budget is None and self.tp_size == 1:  # the engine's rule (`learn_update`)
                out = speculation_room.learn_update(
                    self.config, self.proposer.speculators, sequences, seconds,
                    since if since.request_steps > 0 else None,
                    getattr(self.proposer.controller, "drafting_could_pay", None))
            else:  # an explicit budget; or tensor parallelism: no clock (budget None =
                # one pass over the new sequences), so every rank takes the same steps
                out = speculation_room.learn_all(self.proposer.speculators, sequences, budget)
        self.learns += 1
        self.update_seconds += out.get("update_seconds", 0.0)
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


_CURRENT: dict = {"proposer": None}


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
    logger.info("atlas-rl: speculating in this worker (%s; speculators %s)",
                work.speculation, ", ".join(speculators))
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
