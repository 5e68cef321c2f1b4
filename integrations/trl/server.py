"""TRL's server mode against an atlas rollout server (`atlas-rl serve`): the client side.

The server speculates, learns and exports its metrics by itself, so generation needs no
client change. What `enable_atlas` adds to TRL's `VLLMClient` (the seam rows
``client_*`` in `atlas_rl.integrations.trl`):

- the API key: TRL's client has no key argument; its session sends
  ``Authorization: Bearer KEY`` (`enable_atlas(api_key=...)` or ``ATLAS_RL_API_KEY``);
- weight transfer: where the server's backend is ``atlas_files`` (a CPU server), the
  handshake proves the directory is shared and every sync is a set of files
  (`atlas_rl.backends.vllm.weight_transfer`); any other backend (NCCL on GPUs) goes
  through TRL's own code unchanged;
- metrics: `generate_with_stats` reads the server's ``/metrics`` around a generation;
- checkpoints: `save_server_state` / `load_server_state` (``/atlas/save``, ``/atlas/load``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()


def api_key(configured=None) -> str | None:
    return configured or os.environ.get("ATLAS_RL_API_KEY") or None


def wrap_check_server(original, key_getter):
    @functools.wraps(original)
    def check_server(self, *args, **kwargs):
        key = api_key(key_getter())
        if key:
            from atlas_rl.integrations.trl.hooks import SEAM

            headers = dict(self.session.headers, Authorization=f"Bearer {key}")
            SEAM.assign(self.session, {"headers": headers}, key="client_auth")
            SEAM.assign(self, {"atlas_api_key": key}, key="client_auth")
        return original(self, *args, **kwargs)

    return check_server


def _transfer(client) -> tuple[str | None, str | None]:
    """(backend, directory) of the server's weight transfer."""
    info = client.get_server_info()
    config = info.get("weight_transfer_config") or {}
    backend = config.get("backend") if isinstance(config, dict) else None
    from atlas_rl.backends.vllm import weight_transfer as wt

    extra = info.get("additional_config") or {}
    directory = (extra.get(wt.CONFIG_KEY) or {}).get("directory") if isinstance(extra, dict) \
        else None
    return backend, directory


def wrap_init_communicator(original):
    @functools.wraps(original)
    def init_communicator(self, device=0):
        from atlas_rl.backends.vllm import weight_transfer as wt

        backend, directory = _transfer(self)
        if backend != wt.BACKEND:
            return original(self, device)  # NCCL (GPUs): TRL's own path
        if not directory or not Path(directory).is_dir():
            raise RuntimeError(
                f"the rollout server at {self.base_url} moves weights as files in "
                f"{directory!r}, which this trainer cannot see: run the trainer on the "
                f"server's machine, or mount that directory at the same path here")
        probe = wt.write_probe(directory)
        try:
            self._post(f"{self.base_url}/init_weight_transfer_engine",
                       json={"init_info": {"probe": probe}})
        finally:
            (Path(directory) / probe).unlink(missing_ok=True)
        from atlas_rl.integrations.trl.hooks import SEAM

        SEAM.assign(self, {"atlas_transfer_dir": directory}, key="client_init_communicator")
        logger.info("atlas-rl: weights go to %s as files in %s (the server runs on the CPU)",
                    self.base_url, directory)

    return init_communicator


def wrap_update_named_params(original):
    @functools.wraps(original)
    def update_named_params(self, metadata, named_params):
        directory = getattr(self, "atlas_transfer_dir", None)
        if directory is None:
            return original(self, metadata, named_params)
        from atlas_rl.backends.vllm.weight_transfer import send_weights

        inside = getattr(self, "_updating_weights", False)  # within weight_update()

        def post(path, body):
            if inside and path in ("/start_weight_update", "/finish_weight_update"):
                return None  # the context manager starts and finishes the update
            return self._post(f"{self.base_url}{path}", json=body)

        send_weights(post, directory, named_params)

    return update_named_params


def _read(client) -> dict:
    from atlas_rl.backends.vllm.server_metrics import read_metrics

    try:
        return read_metrics(client.base_url, getattr(client, "atlas_api_key", None))
    except Exception as e:  # noqa: BLE001 (metrics never stop training)
        if "read" not in _WARNED:
            _WARNED.add("read")
            logger.warning("atlas-rl: could not read %s/metrics (%s): no atlas/* metrics",
                           client.base_url, e)
        return {}


def generate_with_stats(client, generate):
    """Run `generate()` (TRL's); return (its output, the batch's atlas stats or {})."""
    before = _read(client)
    start = time.perf_counter()
    out = generate()
    seconds = time.perf_counter() - start
    after = _read(client)
    if not before or not after:
        return out, {}
    from atlas_rl.backends.vllm.server_metrics import batch_stats

    completion_tokens = sum(len(c) for c in out[1])
    return out, batch_stats(before, after, seconds, completion_tokens)


def server_trainer_metrics(stats: dict) -> dict[str, float]:
    from atlas_rl.metrics import atlas_name

    return {atlas_name(k): float(v) for k, v in stats.items()}


def _state_call(client, path: str, directory: str, refused_ok: bool = False):
    response = client.session.post(f"{client.base_url}{path}", json={"directory": directory},
                                   timeout=600)
    if response.status_code == 400 and refused_ok:  # e.g. outside the server's --state-root
        logger.warning("atlas-rl: the server at %s refused to save its speculators to %r (%s); "
                       "this checkpoint holds no server state. Start `atlas-rl serve` with "
                       "--state-root at a directory that holds the trainer's output_dir",
                       client.base_url, directory, response.text[:300])
        return None
    if response.status_code == 404:
        if path not in _WARNED:
            _WARNED.add(path)
            logger.warning("atlas-rl: the server at %s keeps no atlas state (%s): not an "
                           "atlas rollout server?", client.base_url, response.text[:200])
        return None
    if response.status_code != 200:
        raise RuntimeError(f"atlas-rl: {path} on {client.base_url} failed "
                           f"({response.status_code}): {response.text[:500]}")
    return response.json().get("result")


def save_server_state(client, directory: str) -> None:
    """The server saves its speculators into `directory` (a path on its filesystem, under
    the root it was started with: ``atlas-rl serve --state-root``). A refused path costs
    the checkpoint its server state, with a warning, never the training run."""
    _state_call(client, "/atlas/save", directory, refused_ok=True)


def load_server_state(client, directory: str) -> None:
    _state_call(client, "/atlas/load", directory)
