"""New policy weights into a vLLM *server* on a machine without NCCL: the weight-transfer
backend ``atlas_files``, registered in vLLM's weight-transfer factory by the plugin.

TRL's server mode pushes weights through vLLM's weight-transfer API (``/init_weight_
transfer_engine``, ``/start_weight_update``, ``/update_weights``, ``/finish_weight_
update``), and vLLM's built-in backends are NCCL and CUDA IPC: none runs on a CPU. This
backend moves the tensors as safetensors files in a directory that trainer and server
share (``/dev/shm`` on one machine: memory speed; a shared filesystem across machines):

- trainer (`send_weights`): the tensors are written to ``<dir>/<uuid>.safetensors.tmp``
  and renamed, so the server never reads a half-written file; then ``/update_weights``
  names the file and announces every tensor's name, dtype and shape (what TRL announces
  for NCCL). Files are cut at ``chunk_bytes``; each is one ``/update_weights``.
- server (`FileWeightTransferEngine`, in each worker): ``update_weights`` reads a file and
  checks every tensor against the announcement and the model's checkpoint (name, shape,
  floating dtype, finite values: `weight_sync.WeightSync`, the checks
  ``AtlasRolloutEngine.sync_weights`` makes) and *stages* it; nothing touches the model
  yet. A refused chunk drops the whole update (everything staged with it) and raises
  `WeightUpdateRefused`, which `atlas-rl serve` answers with a 422 naming the
  parameters. ``finish_weight_update`` loads the staged weights in one go (rolled back to
  the previous ones if the load itself fails), re-points the drafter at the policy's new
  embedding and head, and deletes the files.
- the directory (`default_directory`, where none is named): owned by the process that
  made it, removed when it exits (normally or by SIGTERM); one left by a process killed
  with SIGKILL is removed when the next one is made (`sweep_stale_directories`).

Why files rather than gloo: a gloo group is a rendezvous on a port the trainer opens
(another port to secure, and both sides block in a collective when one dies mid-update),
whereas a file is checked whole before anything loads (all or nothing falls out), cannot
be half-read (atomic rename), and needs nothing open but the HTTP port. Its cost is one
write and one read of the weights through memory (``/dev/shm``): ~0.5 s for 135M float32
parameters here. GPUs keep vLLM's NCCL backend: `atlas-rl serve` picks this backend only
where vLLM runs on the CPU.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

BACKEND = "atlas_files"
CONFIG_KEY = "atlas_rl_weight_transfer"  # additional_config[CONFIG_KEY] = {"directory": ...}
REFUSED = "atlas-rl refused the weight update"
DEFAULT_CHUNK_BYTES = 1 << 30


class WeightUpdateRefused(ValueError):
    """The update was checked and refused before anything loaded: the server keeps
    serving its previous weights. The message names each bad parameter."""


# --- transfer directories: made, owned, removed ------------------------------------------
#
# `default_directory` names each directory after its owner, the process that made it:
# ``atlas-rl-weights-<pid>-<start>-<random>``, <start> being the process's start time
# (/proc/<pid>/stat field 22, clock ticks after boot), so that a pid the kernel reused
# is not taken for the owner. The owner also holds an flock on the directory for its
# whole life (the kernel drops it when the process dies, SIGKILL included): an owner in
# another pid namespace that shares /dev/shm (two containers of one pod) is still seen
# alive. The owner removes its directory when it exits normally or by SIGTERM; what a
# SIGKILL leaves is removed by the next `default_directory` call on the machine (a server
# starting), which sweeps the directories whose owner is gone. A directory the user named
# (``--weight-transfer-dir``) is never touched: it has no owner name and is not under the
# sweep's root unless the user put it there under our pattern.

PREFIX = "atlas-rl-weights-"
_OWNED_NAME = re.compile(r"atlas-rl-weights-(\d+)-(\d+)-[a-z0-9_]+")
_owned: dict[str, int] = {}  # directory -> fd holding its flock, in the owner process
_owner_pid: int | None = None  # the process that registered the cleanup (not its forks)


def default_root() -> str:
    """``/dev/shm`` where it exists and is writable (memory, not disk), else the temp
    directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def default_directory(root: str | None = None) -> str:
    """A fresh private directory (0700) for one server's transfers, under `root` (default
    `default_root`), owned by this process: removed when it exits normally or by SIGTERM.
    First removes what dead owners left there (`sweep_stale_directories`)."""
    root = root or default_root()
    sweep_stale_directories(root)
    pid = os.getpid()
    directory = tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{_start_time(pid) or 0}-", dir=root)
    _claim(directory)
    return directory


def sweep_stale_directories(root: str | None = None) -> list[str]:
    """Remove the transfer directories under `root` (default `default_root`) whose owner
    is gone (a server killed with SIGKILL: the directory keeps its partial update). Only
    directories named by `default_directory`, this user's, not symlinks, whose owner
    process no longer runs (pid and start time) and whose flock nobody holds; never a
    live one, never anything else. Returns the directories removed."""
    root = root or default_root()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _OWNED_NAME.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(root, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() \
                or _owner_alive(int(match[1]), int(match[2])):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # held: its owner lives, in another pid namespace
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if not os.path.lexists(path):
            removed.append(path)
    if removed:
        logger.info("atlas-rl: removed %d weight-transfer directories whose server is gone: "
                    "%s", len(removed), ", ".join(removed))
    return removed


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot); None if there is no such
    process, or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; starttime is
    # field 22, the 20th after the last ')'
    return int(stat_line.rsplit(b")", 1)[1].split()[19])


def _owner_alive(pid: int, start: int) -> bool:
    if os.path.isdir("/proc/self"):
        return _start_time(pid) == start
    try:  # no /proc: the pid alone, taken as alive when it exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(directory: str) -> None:
    global _owner_pid
    if _owner_pid != os.getpid():  # first here, or a fork: what it inherited is the parent's
        _owned.clear()
        _owner_pid = os.getpid()
        atexit.register(_remove_owned)
        _remove_on_sigterm()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _owned[directory] = fd


def _remove_owned() -> None:
    if os.getpid() != _owner_pid:
        return  # a forked child that inherited the handlers: the directories are not its
    for directory, fd in list(_owned.items()):
        shutil.rmtree(directory, ignore_errors=True)
        os.close(fd)
        _owned.pop(directory, None)


def _remove_on_sigterm() -> None:
    """A process that leaves SIGTERM to the default (death, no atexit) removes its
    directories first and then dies of it as before. A process with its own handler
    keeps it: vLLM's API server turns SIGTERM into a normal exit, where atexit runs."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum, frame):
        _remove_owned()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def transfer_options(vllm_config) -> dict:
    """``additional_config[CONFIG_KEY]``: ``directory``; and, where an `AtlasRolloutEngine`
    (multiprocess) made the config, ``engine`` plus its ``allow_nonfinite`` and
    ``keep_previous`` settings."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    options = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    return options if isinstance(options, dict) else {}


def transfer_directory(vllm_config) -> Path:
    directory = transfer_options(vllm_config).get("directory")
    if not directory:
        raise ValueError(
            f"weight-transfer backend {BACKEND!r} needs a directory that trainer and server "
            f"share: start the server with `atlas-rl serve` (it makes one), or pass "
            f"--additional-config '{{\"{CONFIG_KEY}\": {{\"directory\": \"/dev/shm/DIR\"}}}}'")
    return Path(directory)


def _safe_file(directory: Path, name: Any, what: str) -> Path:
    """A file name from a request, resolved inside `directory` only."""
    if not isinstance(name, str) or not name or os.path.basename(name) != name \
            or name.startswith("."):
        raise WeightUpdateRefused(f"{REFUSED}: {what} must be a bare file name inside the "
                                  f"transfer directory, got {name!r}")
    return directory / name


# --- the server side (a vLLM worker) ---------------------------------------------------


def _engine_base():
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    return WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo


_Engine, _InitInfo, _UpdateInfo = _engine_base()


@dataclass
class FileInitInfo(_InitInfo):
    probe: str = ""  # a file the trainer wrote into the directory: both sides see it


@dataclass
class FileUpdateInfo(_UpdateInfo):
    file: str = ""
    names: list = field(default_factory=list)
    dtype_names: list = field(default_factory=list)
    shapes: list = field(default_factory=list)


class FileWeightTransferEngine(_Engine):
    """The worker side of ``atlas_files`` (module docstring)."""

    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        from atlas_rl.backends.vllm.weight_sync import ModelTarget, WeightSync

        self.directory = transfer_directory(vllm_config)
        options = transfer_options(vllm_config)
        self.sync = WeightSync(ModelTarget(model, vllm_config), str(vllm_config.model_config.model),
                               allow_nonfinite=bool(options.get("allow_nonfinite", False)),
                               keep_previous=bool(options.get("keep_previous", True)))
        if not options.get("engine"):  # a server: the engine's own hint does not apply
            self.sync.nonfinite_override = " (a server never loads them)"
        self.staged: list[tuple[str, torch.Tensor]] = []
        self.files: list[Path] = []

    def init_transfer_engine(self, init_info: FileInitInfo) -> None:
        if init_info.probe:
            probe = _safe_file(self.directory, init_info.probe, "init_info.probe")
            if not probe.is_file():
                raise WeightUpdateRefused(
                    f"{REFUSED}: the server does not see the trainer's file {init_info.probe!r} "
                    f"in {str(self.directory)!r}: trainer and server must share that directory "
                    f"(one machine, or a shared filesystem mounted at the same path)")

    def parse_update_info(self, update_dict):
        if not isinstance(update_dict, dict):
            raise WeightUpdateRefused(f"{REFUSED}: update_info must be a JSON object, got "
                                      f"{type(update_dict).__name__}")
        try:
            return super().parse_update_info(update_dict)
        except ValueError as e:
            raise WeightUpdateRefused(f"{REFUSED}: {e}") from None

    def start_weight_update(self) -> None:
        self._drop()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # no torch.accelerator.synchronize(): nothing is on a device until finish
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, info: FileUpdateInfo) -> None:
        try:
            self._receive(info)
        except Exception:
            self._drop()  # all or nothing: one bad chunk refuses the whole update
            raise

    def _receive(self, info: FileUpdateInfo) -> None:
        from safetensors import safe_open

        from atlas_rl.backends.vllm.weight_sync import WeightSyncError

        path = _safe_file(self.directory, info.file, "update_info.file")
        if not path.is_file():
            raise WeightUpdateRefused(f"{REFUSED}: no file {info.file!r} in the transfer "
                                      f"directory {str(self.directory)!r}")
        self.files.append(path)
        if not (len(info.names) == len(info.dtype_names) == len(info.shapes)):
            raise WeightUpdateRefused(
                f"{REFUSED}: update_info announces {len(info.names)} names, "
                f"{len(info.dtype_names)} dtypes and {len(info.shapes)} shapes")
        problems, tensors = [], []
        already = {name for name, _ in self.staged}
        with safe_open(str(path), "pt") as f:
            present = set(f.keys())
            for name, dtype, shape in zip(info.names, info.dtype_names, info.shapes):
                if name not in present:
                    problems.append(f"{name!r}: announced but not in {info.file!r}")
                    continue
                if name in already:
                    problems.append(f"{name!r}: given twice in one update")
                    continue
                tensor = f.get_tensor(name)
                got = str(tensor.dtype).removeprefix("torch.")
                if got != str(dtype):
                    problems.append(f"{name!r}: dtype {got} in the file, {dtype} announced")
                if list(tensor.shape) != list(shape):
                    problems.append(f"{name!r}: shape {list(tensor.shape)} in the file, "
                                    f"{list(shape)} announced")
                tensors.append((name, tensor))
        if not problems:
            try:
                self.staged += self.sync.stage(tensors)
                return
            except WeightSyncError as e:
                raise WeightUpdateRefused(str(e).replace("sync_weights refused", REFUSED +
                                                         ":", 1)) from None
        shown = "\n".join(f"  - {p}" for p in problems[:10])
        raise WeightUpdateRefused(f"{REFUSED}: {len(problems)} problem(s); nothing was loaded, "
                                  f"the server keeps serving its current weights:\n{shown}")

    def finish_weight_update(self) -> None:
        from atlas_rl.backends.vllm.worker import learning_paused
        from atlas_rl.machine import one_off_allocations

        staged, self.staged = self.staged, []
        try:
            if staged:
                # vLLM's reload: large blocks, allocated once; the idle learner, which
                # reads the policy's embedding, waits
                with one_off_allocations(), learning_paused():
                    self.sync.load(staged, owned=True)  # rolled back if the load fails
                    _drafter_follows(self.model)
        finally:
            self._delete_files()

    def _drop(self) -> None:
        self.staged = []
        self._delete_files()

    def _delete_files(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []

    def shutdown(self) -> None:
        self._drop()


def _drafter_follows(model) -> None:
    """The policy changed: the drafter's frozen parts (the policy's embedding and LM head)
    are re-read from the model, and what it derived from them dropped."""
    from atlas_rl.backends.vllm.worker import current_proposer

    proposer = current_proposer()
    if proposer is not None:
        proposer.policy_weights_changed(model)


def register_backend() -> None:
    """Add ``atlas_files`` to vLLM's weight-transfer factory (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "FileWeightTransferEngine")


# --- the trainer side -------------------------------------------------------------------


def _wire_tensor(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    full = getattr(tensor, "full_tensor", None)  # an FSDP DTensor: gather it
    if callable(full):
        tensor = full()
    # a copy: safetensors refuses tensors that share memory (tied embeddings), and the
    # caller's may change once its iterator moves on (merged adapters, ZeRO-3 gathers)
    return tensor.to("cpu", copy=True).contiguous()


def write_chunks(directory: str | Path, named_params: Iterable[tuple[str, torch.Tensor]],
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[str, dict]]:
    """Write the tensors as safetensors files of about `chunk_bytes` each (atomically:
    written under a temporary name, then renamed); yields (file name, update_info)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        name = f"{uuid.uuid4().hex}.safetensors"
        tmp = directory / f".{name}.tmp"
        save_file(batch, str(tmp))
        os.replace(tmp, directory / name)
        info = {"file": name, "names": list(batch),
                "dtype_names": [str(t.dtype).removeprefix("torch.") for t in batch.values()],
                "shapes": [list(t.shape) for t in batch.values()]}
        return name, info

    for name, tensor in named_params:
        tensor = _wire_tensor(tensor)
        batch[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= chunk_bytes:
            yield flush()
            batch, size = {}, 0
    if batch:
        yield flush()


def send_weights(post, directory: str | Path, named_params: Iterable[tuple[str, torch.Tensor]],
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """One full update over ``atlas_files``: start, a file per chunk, finish. `post(path,
    json)` posts to the server and raises on an error status. Returns the files sent. A
    refused chunk raises the server's message; the server then serves its previous
    weights (the update is dropped whole), and the remaining files are not written."""
    post("/start_weight_update", {})
    sent = 0
    written: list[Path] = []
    try:
        for name, info in write_chunks(directory, named_params, chunk_bytes):
            written.append(Path(directory) / name)
            post("/update_weights", {"update_info": info})
            sent += 1
    except BaseException:
        for path in written:  # the server deletes what it read; this is for the rest
            path.unlink(missing_ok=True)
        raise
    post("/finish_weight_update", {})
    return sent


def write_probe(directory: str | Path) -> str:
    """A small file the server must see at init (`FileInitInfo.probe`)."""
    name = f"probe-{uuid.uuid4().hex}"
    (Path(directory) / name).write_text("atlas-rl weight transfer probe\n")
    return name
