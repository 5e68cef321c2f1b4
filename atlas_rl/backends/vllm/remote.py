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
    from atlas_rl.metrics import summarize, summarize_arms, summarize_history

    proposer = proposer_of(worker)
    work = proposer.worker
    c = proposer.counters
    out = {"rank": _rank(worker), "speculation": work.speculation,
           "counters": dataclasses.asdict(c),
           "summary": {**summarize(c), **summarize_arms(c), **summarize_history(c)},
           "learns": work.learns, "update_seconds": work.update_seconds,
           "update_errors": work.update_errors,
           "last_update": dict(work.last_update),
           "published_version": work.published_version(),
           "completed_waiting": len(proposer.completed),
           "weight_syncs": proposer.weight_syncs,
           "drafter_reads_policy": _drafter_reads_policy(proposer),
           "speculators": list(proposer.speculators)}
    neural = proposer.speculators.get("neural")
    if neural is not None:
        out["drafter_rollbacks"] = int(getattr(neural, "rollbacks", 0) or 0)
    return out


def _drafter_reads_policy(proposer) -> bool | None:
    """Whether every drafter's frozen embedding and head are the policy's current ones
    (the same values as the served model's), None without a drafter that reads them."""
    import torch

    from atlas_rl.backends.vllm.proposer import target_embeddings

    readers = proposer._readers()
    if not readers or proposer.target_model is None:
        return None
    embed, head = target_embeddings(proposer.target_model)
    return all(getattr(s, "_embed", None) is not None and torch.equal(s._embed, embed)
               and torch.equal(s._head, head) for s in readers)


def learn(worker, budget: float | None = None, batch_done: bool = False) -> dict:
    """Learn the completed sequences now (seconds; None: the configured share).
    ``batch_done``: the caller's requests have all returned (an `AtlasRolloutEngine`
    between generate calls): the ones vLLM has not reported finished yet (it does so at
    the next step) count as completed too."""
    proposer = proposer_of(worker)
    if batch_done:
        proposer.end_batch()
    return proposer.worker.learn(budget)


def save(worker, directory: str) -> bool:
    """Rank 0 writes the state (atomically); True where this worker wrote."""
    if _rank(worker) != 0:
        return False
    proposer_of(worker).worker.save(directory)
    return True


def load(worker, directory: str) -> int:
    """Every rank loads the state; returns the published drafter version."""
    work = proposer_of(worker).worker
    work.load(directory)
    return work.published_version()


def digest(worker) -> str:
    """A hash of every speculator's saved tensors and metadata (`speculation.state_digest`):
    equal digests mean equal speculators (ranks kept in step; a restart resumed the same
    state)."""
    from atlas_rl.speculation import state_digest

    return state_digest(proposer_of(worker).speculators)


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
