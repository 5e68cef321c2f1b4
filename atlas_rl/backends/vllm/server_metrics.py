"""The proposer's counters on vLLM's Prometheus ``/metrics``, under ``atlas_``, beside
vLLM's own ``vllm:spec_decode_*`` counters.

The proposer lives in a worker (the engine core's process, or a worker process); vLLM's
``/metrics`` is served by the API server process from its registry. The worker writes a
snapshot of its counters to a small JSON file (atomically, from a thread every
`WRITE_INTERVAL` seconds while they change, and after every update); a collector registered in the API
server's registry (by the plugin, where the engine config is built, only when atlas is
named) reads it at each scrape. The file's path travels in the atlas fields
(``metrics_file``). With ``--api-server-count > 1`` vLLM serves ``/metrics`` from its
multiprocess collector instead, which does not include these.

`read_metrics` is the client side: a trainer that talks to such a server scrapes
``/metrics`` and gets the same names `AtlasRolloutEngine.stats()` uses.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "atlas_"
WRITE_INTERVAL = 0.5  # seconds between snapshots while generating

# (metric, kind, help); per-position and per-lookahead series carry a label
COUNTERS = (
    ("drafts", "request-steps whose draft was verified"),
    ("draft_tokens", "draft tokens verified"),
    ("accepted_tokens", "draft tokens accepted"),
    ("request_steps", "decode request-steps the proposer saw"),
    ("speculator_errors", "speculator failures (each degraded that step to no drafts)"),
    ("updates", "online updates of the speculators"),
    ("update_seconds", "seconds spent in online updates (in the engine's steps or idle)"),
    ("idle_updates", "of the online updates, those learnt while the engine was idle"),
    ("idle_update_seconds", "seconds spent learning while the engine was idle (free time)"),
    ("idle_updates_stopped", "idle updates an engine step cut short"),
    ("propose_seconds", "seconds spent in the proposer"),
    ("nonfinite_logit_rows", "logits rows found NaN or inf where tokens were drawn (a "
                             "diverged policy)"),
    ("failed_requests", "requests failed because a token of theirs was drawn from NaN or "
                        "inf logits (finish_reason 'error')"),
)
GAUGES = (
    ("acceptance_length", "tokens per verified draft, 1 + accepted / drafts (cumulative)"),
    ("published_version", "the adaptive drafter's published version"),
    ("drafter_loss", "the last update's drafter loss"),
    ("restored", "1 if the speculators were loaded from the state directory at start"),
    ("learning_now", "1 while the idle learner is learning"),
    ("learning_waiting", ("sequences the idle learner will learn at the next idle moment "
                          "(+1 for an update a step cut short)")),
    ("state_fingerprint", "the last saved or loaded speculator state's sha256, first 52 "
                          "bits: equal values, equal speculators"),
)


def snapshot(proposer, work) -> dict:
    """The numbers the collector exports: the proposer's counters, its worker-side
    learner's (`worker.WorkerSpeculation`) state."""
    c = proposer.counters
    snap = {"drafts": c.num_drafts, "draft_tokens": c.num_draft_tokens,
            "accepted_tokens": c.num_accepted_tokens, "request_steps": c.request_steps,
            "speculator_errors": c.speculator_errors, "updates": work.learns,
            "update_seconds": work.update_seconds, "propose_seconds": c.propose_seconds,
            "nonfinite_logit_rows": int(getattr(work.sampler, "atlas_nonfinite_rows", 0)),
            "failed_requests": int(getattr(work.sampler, "atlas_failed_requests", 0)),
            "acceptance_length": 1.0 + c.num_accepted_tokens / c.num_drafts if c.num_drafts else 1.0,
            "published_version": work.published_version(),
            "restored": int(work.restored),
            "draft_tokens_per_position": list(c.drafted_per_pos),
            "accepted_tokens_per_position": list(c.accepted_per_pos),
            "lookahead": list(c.lookahead_hist),
            "engine_steps_by_batch": list(c.batch_steps),
            "drafting_steps_by_batch": list(c.batch_drafting_steps)}
    idle = work.idle
    if idle is not None:
        snap.update(idle_updates=idle.updates, idle_update_seconds=idle.seconds,
                    idle_updates_stopped=idle.stopped, learning_now=int(idle.learning),
                    learning_waiting=idle.pending())
    if work.fingerprint is not None:
        snap["state_fingerprint"] = work.fingerprint
    if "drafter_loss" in work.last_update:
        snap["drafter_loss"] = work.last_update["drafter_loss"]
    return snap


class SnapshotWriter:
    """Writes the proposer's snapshot every `WRITE_INTERVAL` seconds while it changes,
    from a daemon thread (so the last steps before the engine goes idle are written
    too), and at once on `write`."""

    def __init__(self, path: str, proposer, work):
        self.path = Path(path)
        self.proposer, self.work = proposer, work
        self._lock = threading.Lock()
        self._last_written = None
        threading.Thread(target=self._loop, name="atlas-rl-metrics", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(WRITE_INTERVAL)
            try:
                self.write()
            except Exception:  # metrics never disturb serving
                logger.debug("atlas-rl: metrics snapshot not written", exc_info=True)

    def write(self) -> None:
        with self._lock:
            snap = snapshot(self.proposer, self.work)
            if snap == self._last_written:
                return
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(snap))
            os.replace(tmp, self.path)
            self._last_written = snap


class AtlasCollector:
    """A prometheus_client collector over the worker's snapshot file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            snap = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # no step yet (or a partial write elsewhere): nothing to report
        for name, doc in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=float(snap.get(name, 0)))
        for name, doc in GAUGES:
            if name in snap:
                yield GaugeMetricFamily(PREFIX + name, doc, value=float(snap[name]))
        for name, doc, label in (
                ("draft_tokens_per_position", "draft tokens verified at each draft position",
                 "position"),
                ("accepted_tokens_per_position", "draft tokens accepted at each draft position",
                 "position"),
                ("lookahead", "request-steps drafted with each lookahead", "lookahead")):
            family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
            for i, v in enumerate(snap.get(name, [])):
                family.add_metric([str(i)], float(v))
            yield family
        for name, doc in (
                ("engine_steps_by_batch", "engine steps by batch size (label: at most that "
                                          "many requests)"),
                ("drafting_steps_by_batch", "of those, the steps with speculation on")):
            family = CounterMetricFamily(PREFIX + name, doc, labels=["batch"])
            for b, v in enumerate(snap.get(name, [])):
                family.add_metric([str(2 ** b)], float(v))
            yield family


_registered: set[str] = set()


def register_collector(path: str) -> None:
    """In the API server's process: export `path`'s snapshots on its /metrics."""
    if path in _registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(AtlasCollector(path))
    _registered.add(path)


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {name or name{labels}: value} (samples only)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def read_metrics(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> dict:
    """A server's atlas metrics by the names `AtlasRolloutEngine.stats()` uses
    (``acceptance_length``, ``acceptance_rate_pos_i``, ``num_draft_tokens``, ...),
    from its ``/metrics``."""
    request = urllib.request.Request(base_url.rstrip("/") + "/metrics")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        samples = parse_exposition(response.read().decode())

    def get(name):
        return samples.get(PREFIX + name + "_total", samples.get(PREFIX + name))

    drafts, tokens, accepted = get("drafts"), get("draft_tokens"), get("accepted_tokens")
    if drafts is None:
        return {}
    out = {"num_drafts": drafts, "num_draft_tokens": tokens, "num_accepted_tokens": accepted,
           "acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
           "acceptance_rate": accepted / tokens if tokens else 0.0,
           "update_seconds": get("update_seconds") or 0.0,
           "updates": get("updates") or 0.0,
           "idle_updates": get("idle_updates") or 0.0,
           "idle_update_seconds": get("idle_update_seconds") or 0.0,
           "idle_updates_stopped": get("idle_updates_stopped") or 0.0,
           "learning_now": get("learning_now") or 0.0,
           "learning_waiting": get("learning_waiting") or 0.0,
           "speculator_errors": get("speculator_errors") or 0.0,
           "drafter_version": get("published_version") or 0.0}
    i = 0
    while True:
        d = samples.get(f'{PREFIX}draft_tokens_per_position_total{{position="{i}"}}')
        a = samples.get(f'{PREFIX}accepted_tokens_per_position_total{{position="{i}"}}')
        if d is None:
            break
        out[f"draft_tokens_pos_{i}"], out[f"accepted_tokens_pos_{i}"] = d, a or 0.0
        if d:
            out[f"acceptance_rate_pos_{i}"] = (a or 0.0) / d
        i += 1
    return out


def batch_stats(before: dict, after: dict, seconds: float, completion_tokens: int) -> dict:
    """One generation's figures from two `read_metrics` readings around it (the server's
    counters are cumulative; with other clients on the same server they include theirs)."""
    def delta(key):
        return float(after.get(key, 0.0)) - float(before.get(key, 0.0))

    drafts, tokens, accepted = (delta(k) for k in ("num_drafts", "num_draft_tokens",
                                                   "num_accepted_tokens"))
    out = {"acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
           "acceptance_rate": accepted / tokens if tokens else 0.0,
           "lookahead": tokens / drafts if drafts else 0.0,
           "rollout_seconds": seconds,
           "tokens_per_s": completion_tokens / seconds if seconds > 0 else 0.0,
           "server_update_seconds": delta("update_seconds"),
           "server_updates": float(after.get("updates", 0.0)),
           "server_speculator_errors": float(after.get("speculator_errors", 0.0)),
           "drafter_version": float(after.get("drafter_version", 0.0))}
    i = 0
    while f"draft_tokens_pos_{i}" in after:
        d = delta(f"draft_tokens_pos_{i}")
        if d:
            out[f"acceptance_rate_pos_{i}"] = delta(f"accepted_tokens_pos_{i}") / d
        i += 1
    return out
