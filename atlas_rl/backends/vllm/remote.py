"""Reaching a proposer that lives in a vLLM worker (multiprocessing on, ``vllm serve``,
Ray): functions for vLLM's ``collective_rpc``, each called in every worker with the
worker as its first argument, returning plain data. Across processes vLLM sends only
method names (callables need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), so they are also
methods of `AtlasWorkerExtension`, which the plugin names as vLLM's
``worker_extension_cls`` when atlas is in the config and no other extension is:

    llm.collective_rpc("atlas_stats")           # one dict per worker
    llm.collective_rpc("atlas_save", args=(directory,))

`AtlasRolloutEngine` uses them in multiprocess mode (its API is the same in both modes).
With tensor parallelism every rank answers; the ranks' speculators are identical
(`worker`), so callers read rank 0's answer and only rank 0 writes state.
"""

from __future__ import annotations

import dataclasses


class NotAtlasWorker(RuntimeError):
    pass


def proposer_of(worker):
    runner = getattr(worker, "model_runner", None)
    drafter = getattr(runner, "drafter", None)
    if drafter is None or getattr(drafter, "worker", None) is None:
        raise NotAtlasWorker(
            "this vLLM worker does not speculate with atlas: start vLLM with atlas's "
            "speculative config (`atlas-rl speculative-config`, or atlas_rl."
            "speculative_config()) and the atlas-rl plugin installed")
    return drafter


def _rank(worker) -> int:
    return int(getattr(worker, "rank", 0) or 0)


def stats(worker) -> dict:
    """The proposer's counters (cumulative), the learner's state and the controller's
    lookahead by batch size."""
    from atlas_rl.metrics import summarize, summarize_arms, summarize_history, summarize_plans

    proposer = proposer_of(worker)
    work = proposer.worker
    c = proposer.counters
    out = {"rank": _rank(worker), "speculation": work.speculation,
           "counters": dataclasses.asdict(c),
           "summary": {**summarize(c), **summarize_arms(c), **summarize_history(c),
                       **summarize_plans(c)},
           "learns": work.learns, "update_seconds": work.update_seconds,
           "update_errors": work.update_errors,
           "last_update": dict(work.last_update),
           "published_version": work.published_version(),
           "completed_waiting": len(proposer.completed),
           "weight_syncs": proposer.weight_syncs,
           "drafter_reads_policy": proposer.drafter_reads_policy(),
           # logits rows atlas-rl's sampler saw NaN or inf (a diverged policy)
           "nonfinite_logit_rows": getattr(getattr(getattr(worker, "model_runner", None),
                                                   "rejection_sampler", None),
                                           "atlas_nonfinite_rows", None),
           "speculators": list(proposer.speculators)}
    neural = proposer.speculators.get("neural")
    if neural is not None:
        out["drafter_rollbacks"] = int(getattr(neural, "rollbacks", 0) or 0)
    return out


def learn(worker, budget: float | None = None, batch_done: bool = False) -> dict:
    """Learn the completed sequences now (seconds; None: the configured share).
    ``batch_done``: the caller's requests have all returned (an `AtlasRolloutEngine`
    between generate calls): the ones vLLM has not reported finished yet (it does so at
    the next step) count as completed too."""
    proposer = proposer_of(worker)
    with proposer.worker.paused():
        if batch_done:
            proposer.end_batch()
        return proposer.worker.learn(budget)


def save(worker, directory: str) -> bool:
    """Rank 0 writes the state (atomically); True where this worker wrote."""
    if _rank(worker) != 0:
        return False
    work = proposer_of(worker).worker
    with work.paused():
        work.save(directory)
    return True


def load(worker, directory: str) -> int:
    """Every rank loads the state; returns the published drafter version."""
    work = proposer_of(worker).worker
    with work.paused():
        work.load(directory)
        return work.published_version()


def digest(worker) -> str:
    """A hash of every speculator's saved tensors and metadata (`speculation.state_digest`):
    equal digests mean equal speculators (ranks kept in step; a restart resumed the same
    state)."""
    from atlas_rl.speculation import state_digest

    proposer = proposer_of(worker)
    with proposer.worker.paused():
        return state_digest(proposer.speculators)


class RemoteProposer:
    """The client's handle on a proposer in vLLM's worker(s): what `AtlasRolloutEngine`
    needs of an in-process proposer (`counters`, `begin_batch`, `controller`), plus
    learn / save / load, each one ``collective_rpc``; rank 0 answers."""

    controller = None  # lives in the worker; saved and loaded with the speculators

    def __init__(self, llm):
        self.llm = llm
        try:
            self.stats()
        except Exception as e:  # say what is missing, not vLLM's traceback
            raise RuntimeError(
                f"vLLM's worker does not speculate with atlas ({type(e).__name__}: {e}); "
                "the atlas-rl vLLM plugin must be installed where vLLM runs (`pip install "
                "atlas-rl`, or `pip install -e .` in a checkout: it registers the "
                "vllm.general_plugins entry point), and the engine must have no other "
                "worker_extension_cls") from e

    def _call(self, name, *args):
        return self.llm.collective_rpc(name, args=args)[0]

    def stats(self) -> dict:
        return self._call("atlas_stats")

    @property
    def counters(self):
        from atlas_rl.metrics import SpecCounters

        return SpecCounters(**self.stats()["counters"])

    def begin_batch(self) -> None:
        """Nothing to do: the worker releases each request's state when it finishes."""

    def learn(self, budget: float | None = None) -> dict:
        return self._call("atlas_learn", budget, True)

    def save(self, directory) -> None:
        self.llm.collective_rpc("atlas_save", args=(str(directory),))

    def load(self, directory) -> None:
        self.llm.collective_rpc("atlas_load", args=(str(directory),))

    def digest(self) -> str:
        return self._call("atlas_digest")


def worker_message(text: str) -> str:
    """The worker's own message out of vLLM's relay ("Call to collective_rpc method failed:
    Worker failed with error '...', please check the stack trace above ...")."""
    head = "Worker failed with error '"
    if head in text:
        text = text.split(head, 1)[1]
        text = text.rsplit("', please check", 1)[0]
    return text


class RemoteWeightSync:
    """``AtlasRolloutEngine(multiprocess=True).sync_weights``: the checked, all-or-nothing
    path of `atlas-rl serve` (`weight_transfer`, backend ``atlas_files``) driven through
    ``collective_rpc`` instead of HTTP. The tensors are written as safetensors files into
    the engine's private transfer directory (``/dev/shm``); every worker checks them all
    (the checks of the in-process sync: names, shapes, floating dtypes, finite values)
    and stages them; the load happens at ``finish_weight_update``, in one go, rolled back
    to the previous weights if it fails; the drafter then re-reads the policy's embedding
    and head, and the prefix cache is reset. A refused sync raises `WeightSyncError` with
    the in-process engine's message; the engine keeps serving its previous weights."""

    def __init__(self, llm, directory: str, chunk_bytes: int | None = None):
        from atlas_rl.backends.vllm import weight_transfer as wt

        self.llm = llm
        self.directory = directory
        self.chunk_bytes = chunk_bytes or wt.DEFAULT_CHUNK_BYTES
        self.broken: str | None = None
        self._initialised = False
        self.last_timings: dict[str, float] = {}

    def _rpc(self, method: str, *args):
        from atlas_rl.backends.vllm.weight_sync import EngineBrokenError, WeightSyncError
        from atlas_rl.backends.vllm.weight_transfer import REFUSED

        try:
            return self.llm.collective_rpc(method, args=args)
        except Exception as e:  # noqa: BLE001 (vLLM relays the worker's error as text)
            message = worker_message(str(e))
            if REFUSED in message:
                raise WeightSyncError(message.replace(REFUSED + ":", "sync_weights refused",
                                                      1)) from None
            if "could not restore its weights" in message:
                self.broken = message
                raise EngineBrokenError(message) from None
            raise

    def _post(self, path: str, payload: dict) -> None:
        if path == "/update_weights":
            self._rpc("update_weights", payload["update_info"])
        else:  # /start_weight_update, /finish_weight_update
            self._rpc(path.lstrip("/"))

    def _end_session(self) -> None:
        """After a failure on this side (the caller's iterator raised) or a failed load,
        the workers' update session is still open and the next ``start_weight_update``
        would be refused: vLLM's worker closes a session whose update fails, so an empty
        announcement (refused: it names no file) closes it, dropping whatever was staged."""
        try:
            self.llm.collective_rpc("update_weights", args=({"file": ""},))
        except Exception:  # noqa: BLE001 (refused, as intended, or no session was open)
            pass

    def sync(self, weights) -> None:
        import time
        from pathlib import Path

        from atlas_rl.backends.vllm import weight_transfer as wt
        from atlas_rl.backends.vllm.weight_sync import EngineBrokenError, named_tensor

        if self.broken:
            raise EngineBrokenError(self.broken)
        start = time.perf_counter()
        if not self._initialised:  # the worker must see the directory this process writes
            probe = wt.write_probe(self.directory)
            try:
                self._rpc("init_weight_transfer_engine", {"probe": probe})
            finally:
                (Path(self.directory) / probe).unlink(missing_ok=True)
            self._initialised = True
        pairs = (named_tensor(item) for item in weights)
        try:
            wt.send_weights(self._post, self.directory, pairs, self.chunk_bytes)
        except BaseException:
            self._end_session()
            raise
        self.llm.reset_prefix_cache()  # its KV was computed with the previous weights
        self.last_timings = {"sync_seconds": time.perf_counter() - start}


EXTENSION_CLASS = "atlas_rl.backends.vllm.remote.AtlasWorkerExtension"


class AtlasWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): the functions above as
    worker methods, callable by name through ``collective_rpc``."""

    def atlas_stats(self) -> dict:
        return stats(self)

    def atlas_learn(self, budget: float | None = None, batch_done: bool = False) -> dict:
        return learn(self, budget, batch_done)

    def atlas_save(self, directory: str) -> bool:
        return save(self, directory)

    def atlas_load(self, directory: str) -> int:
        return load(self, directory)

    def atlas_digest(self) -> str:
        return digest(self)
