"""`atlas-rl serve`: the rollout server for TRL's server mode, secure by default.

It starts vLLM's own OpenAI-compatible server the way ``trl vllm-serve`` does (weight
transfer on, ``--logprobs-mode processed_logprobs --max-logprobs -1``, vLLM's development
endpoints, which TRL's client needs) plus:

- atlas's speculative config (``--speculation atlas|atlas-static|none``, ``--state-dir``,
  ``--learn-every``, ``--set FIELD=VALUE``);
- weight transfer that works where vLLM runs: NCCL on GPUs (TRL's client unchanged),
  atlas-rl's ``atlas_files`` backend on a CPU (`weight_transfer`), in a directory the
  server owns and removes at exit, or that the next server's start removes if it was
  killed (``--weight-transfer-dir``: the user's, never removed);
- on a CPU, a KV cache sized for the model, ``--max-model-len`` and ``--max-num-seqs``,
  at most a quarter of the memory available at start (`choose_kv_cache_bytes`; the
  launcher says what it chose), where vLLM would reserve 92% of the machine whatever
  else runs and refuse to start beside a trainer; the user's own sizing wins;
- `AtlasGuard`, an ASGI middleware vLLM loads (``--middleware``), which
  * binds nothing itself, but the launcher refuses a non-loopback ``--host`` without an
    API key (``--api-key`` or ``ATLAS_RL_API_KEY``): TRL's launcher binds 0.0.0.0 with
    the development endpoints (weight updates, ``/collective_rpc``, ``/sleep``) open;
  * with a key, requires ``Authorization: Bearer KEY`` on every path but ``/health``,
    ``/ping``, ``/version`` and ``/metrics`` (vLLM's own ``--api-key`` guards ``/v1``
    only, not the weight-update or RPC endpoints);
  * bounds request bodies (``--max-body-mb``, default 32), ``max_tokens`` (``--max-
    tokens-limit``, default 16384) and ``n`` (``--max-n``, default 64), and refuses
    generation requests vLLM would take badly (not JSON, an empty prompt, n < 1, a
    negative temperature) with a 400 that names the field and the fix;
  * answers ``/update_weights`` and ``/finish_weight_update`` itself when the backend is
    ``atlas_files``: a refused update is a 422 naming the parameters (the server keeps
    its weights); the staged weights are applied with generation paused until the
    requests in flight finish (``pause(mode="wait")``), so **no completion ever mixes two
    policies**: a request that started before the update finishes on the old weights,
    one that arrives during it waits and runs on the new ones; the prefix cache is
    cleared with the pause;
  * serves the speculator's state: ``GET /atlas/stats``, ``POST /atlas/save``,
    ``/atlas/load``, ``/atlas/learn`` (``{"directory": ...}``), key-guarded like the
    rest: what `enable_atlas` uses to checkpoint the server's speculators. Save and load
    take directories under the state root only (``--state-root``, default ``--state-
    dir``; relative paths resolve under it; ``..`` and symlinks out are refused with a
    400 naming the root, `confine`), on ``/collective_rpc`` too; with no root they are
    refused.

The middleware reads its settings from ``ATLAS_RL_SERVE`` (JSON; the key only as its
SHA-256), which the launcher sets.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import socket
import sys

from atlas_rl.backends.vllm.remote import worker_message

logger = logging.getLogger(__name__)

ENV = "ATLAS_RL_SERVE"
API_KEY_ENV = "ATLAS_RL_API_KEY"
GUARD_CLASS = "atlas_rl.backends.vllm.serve.AtlasGuard"
DEFAULTS = {"max_body_mb": 32.0, "max_tokens_limit": 16384, "max_n": 64}
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
WEIGHT_PATHS = frozenset({"/init_weight_transfer_engine", "/update_weights",
                          "/finish_weight_update"})
STATE_RPC = {"/atlas/stats": "atlas_stats", "/atlas/save": "atlas_save",
             "/atlas/load": "atlas_load", "/atlas/learn": "atlas_learn"}
PATH_METHODS = frozenset({"atlas_save", "atlas_load"})  # take a directory: confined
RPC_PATH = "/collective_rpc"


# --- the launcher -----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-rl serve",
        description="vLLM's server for TRL's server mode (vllm_mode='server'), speculating "
                    "with atlas; secure by default. Flags it does not know go to `vllm "
                    "serve` (e.g. --dtype, --max-model-len, --tensor-parallel-size, "
                    "--data-parallel-size).")
    p.add_argument("--model", default=None, help="a hub id or a local folder (or the first "
                   "argument: atlas-rl serve MODEL ...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); any other needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"clients send 'Authorization: Bearer KEY' (or set {API_KEY_ENV}); "
                        "required to bind beyond loopback")
    p.add_argument("--speculation", choices=("atlas", "atlas-static", "none"), default="atlas")
    p.add_argument("--state-dir", default=None,
                   help="load the speculators from here at start, save them after updates")
    p.add_argument("--state-root", default=None,
                   help="POST /atlas/save and /atlas/load take directories under this one "
                        "only (relative ones resolve under it; default: --state-dir; with "
                        "neither they are refused)")
    p.add_argument("--learn-every", type=int, default=None,
                   help="learn in a step once this many completed requests wait (default "
                        "16; 8x that while the worker learns in the engine's idle time, "
                        "--set learn_when_idle=false to switch that off)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", default=[],
                   help="any AtlasConfig field (repeatable), e.g. --set max_lookahead=4")
    p.add_argument("--weight-transfer", choices=("auto", "atlas_files", "nccl", "none"),
                   default="auto", help="auto: nccl on GPUs, atlas_files on a CPU")
    p.add_argument("--weight-transfer-dir", default=None,
                   help="atlas_files: the directory trainer and server share (default: a "
                        "fresh one in /dev/shm, removed when the server exits; this one is "
                        "never removed)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULTS["max_body_mb"])
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULTS["max_tokens_limit"])
    p.add_argument("--max-n", type=int, default=DEFAULTS["max_n"])
    return p


class ServeError(ValueError):
    pass


def plan(argv: list[str], environ=None) -> tuple[list[str], dict[str, str]]:
    """(vLLM CLI argv, environment additions) for `atlas-rl serve ARGV`; raises
    `ServeError` with the fix on bad flags."""
    environ = os.environ if environ is None else environ
    argv = list(argv)
    first = argv.pop(0) if argv and not argv[0].startswith("-") else None
    args, extra = build_parser().parse_known_args(argv)
    model = args.model or first
    if not model:
        raise ServeError("no model: atlas-rl serve --model MODEL (a hub id or a local folder)")
    for flag in ("--api-key", "--middleware", "--weight-transfer-config", "--speculative-config"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ServeError(f"{flag} is set by atlas-rl serve: use its own flags "
                             f"(atlas-rl serve --help)")
    key = args.api_key or environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not key:
        raise ServeError(
            f"refusing to bind {args.host!r} without an API key: anyone who reaches the port "
            f"could replace the model's weights or call worker methods. Pass --api-key KEY "
            f"(or set {API_KEY_ENV}; clients send 'Authorization: Bearer KEY'), or bind "
            f"127.0.0.1")
    for name, value, low in (("--max-body-mb", args.max_body_mb, 0.001),
                             ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--max-n", args.max_n, 1)):
        if value < low:
            raise ServeError(f"{name} must be >= {low}, got {value}")
    vllm_argv = ["serve", model, "--host", args.host, "--port", str(args.port),
                 "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1",
                 "--middleware", GUARD_CLASS]
    extra_env: dict[str, str] = {}
    if args.speculation != "none":
        from atlas_rl.backends.vllm.plugin import speculative_config

        fields = {}
        for item in args.set:
            field, sep, raw = item.partition("=")
            if not sep or not field:
                raise ServeError(f"--set takes FIELD=VALUE, got {item!r}")
            try:
                fields[field] = json.loads(raw)
            except json.JSONDecodeError:
                fields[field] = raw
        serving = {"state_dir": args.state_dir, "learn_every": args.learn_every}
        for name in ("state_dir", "learn_every", "auto_learn"):
            if name in fields and serving.get(name) is None:
                serving[name] = fields.pop(name)
        args.state_dir = serving["state_dir"]
        if fields.get("cpu_reuse_freed_memory") is False:
            from atlas_rl.machine import SYSTEM_ALLOCATOR_ENV

            extra_env[SYSTEM_ALLOCATOR_ENV] = "1"
        try:
            spec = speculative_config(args.speculation, **serving, **fields)
        except (ValueError, TypeError) as e:
            raise ServeError(str(e)) from None
        vllm_argv += ["--speculative-config", json.dumps(spec)]
    backend = args.weight_transfer
    if backend == "auto":
        backend = "atlas_files" if _cpu_only() else "nccl"
    if backend != "none":
        vllm_argv += ["--weight-transfer-config", json.dumps({"backend": backend})]
        if backend == "atlas_files":
            from atlas_rl.backends.vllm import weight_transfer as wt

            directory = args.weight_transfer_dir
            if directory is None:  # owned by this process, the API server to be
                directory = wt.default_directory()
            else:  # the user's: never removed; what killed servers left is, all the same
                wt.sweep_stale_directories()
                os.makedirs(directory, mode=0o700, exist_ok=True)
            if not any(a.startswith("--additional-config") for a in extra):
                vllm_argv += ["--additional-config",
                              json.dumps({wt.CONFIG_KEY: {"directory": directory}})]
    guard = {"api_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
             "max_body_bytes": int(args.max_body_mb * (1 << 20)),
             "max_tokens_limit": args.max_tokens_limit, "max_n": args.max_n,
             "weight_transfer": backend,
             "state_root": _realpath(args.state_root or args.state_dir)}
    env = {"VLLM_SERVER_DEV_MODE": "1", ENV: json.dumps(guard), **extra_env}
    return vllm_argv + extra, env


def _realpath(path) -> str | None:
    return os.path.realpath(os.path.expanduser(str(path))) if path else None


def _cpu_only() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# --- the KV cache on a CPU ----------------------------------------------------------------
#
# vLLM's CPU worker reserves --gpu-memory-utilization (default 0.92) of the machine's
# memory, whatever else runs, and refuses to start when less is free; an explicit KV
# cache size (--kv-cache-memory-bytes, or VLLM_CPU_KVCACHE_SPACE in GiB, which vLLM's CPU
# platform turns into it) skips that check and reserves just the cache. On one machine
# TRL's server mode always has a trainer beside the server, so the launcher sizes the
# cache itself unless the user did.

KV_SHARE_OF_AVAILABLE = 0.25  # of the memory available at start: the rest is the trainer's
CPU_BLOCK_SIZE = 128  # vLLM's CPU default (platforms/cpu.py)
_KV_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def choose_kv_cache_bytes(per_token: int, max_model_len: int, max_num_seqs: int,
                          available: int, block_size: int = CPU_BLOCK_SIZE,
                          share: float = KV_SHARE_OF_AVAILABLE) -> tuple[int, str]:
    """(bytes, why) for a CPU server's KV cache: what `max_num_seqs` sequences of
    `max_model_len` tokens need, at most `share` of the memory `available` now, at least
    one full sequence (vLLM refuses to start with less). Raises `ServeError` when even
    that does not fit in what is available."""
    least = per_token * block_size * (-(-max_model_len // block_size) + 1)  # + a block
    want = max(per_token * max_model_len * max_num_seqs, least)
    cap = int(share * available)
    if want <= cap:
        return want, (f"what {max_num_seqs} sequences (--max-num-seqs) of {max_model_len} "
                      f"tokens (--max-model-len) need")
    if least <= cap:
        return cap, (f"{share:.0%} of the {_gib(available)} GiB available now (the rest for "
                     f"a trainer beside it); {max_num_seqs} sequences of {max_model_len} "
                     f"tokens would need {_gib(want)} GiB")
    if least <= available:
        return least, (f"one sequence of {max_model_len} tokens (--max-model-len), the "
                       f"least vLLM starts with: more than {share:.0%} of the "
                       f"{_gib(available)} GiB available now")
    raise ServeError(
        f"the KV cache for one sequence of {max_model_len} tokens needs {_gib(least)} GiB "
        f"and {_gib(available)} GiB is available: lower --max-model-len, or free memory")


def size_kv_cache(vllm_argv: list[str], environ=None) -> tuple[list[str], str | None]:
    """On a CPU: the vLLM flags that size the KV cache (`choose_kv_cache_bytes`) and the
    line that says what was chosen and why; ([], None) where the user sized it
    (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes, --gpu-memory-utilization)."""
    environ = os.environ if environ is None else environ
    if environ.get("VLLM_CPU_KVCACHE_SPACE") or any(
            a.split("=", 1)[0].replace("_", "-") in _KV_FLAGS for a in vllm_argv):
        return [], None
    from atlas_rl.backends.vllm.engine import kv_bytes_per_token
    from atlas_rl.compat import vllm_cpu

    vllm_cpu.fix_cli_version()
    from vllm.config import CacheConfig, ParallelConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers())
    args = parser.parse_args(vllm_argv)  # as vLLM will (a --config file included)
    args.model = args.model_tag or args.model
    engine = AsyncEngineArgs.from_cli_args(args)
    if engine.kv_cache_memory_bytes is not None or \
            engine.gpu_memory_utilization != CacheConfig.gpu_memory_utilization:
        return [], None
    available = _available_memory()
    try:
        model = engine.create_model_config()
        parallel = ParallelConfig(tensor_parallel_size=engine.tensor_parallel_size,
                                  pipeline_parallel_size=engine.pipeline_parallel_size)
        dtype = model.dtype if engine.kv_cache_dtype == "auto" else \
            STR_DTYPE_TO_TORCH_DTYPE.get(engine.kv_cache_dtype, model.dtype)
        per_token, shape = kv_bytes_per_token(model, parallel, dtype)
        world = engine.tensor_parallel_size * engine.pipeline_parallel_size
        seqs = engine.max_num_seqs or \
            AsyncEngineArgs.get_batch_defaults(world)[1][UsageContext.OPENAI_API_SERVER]
    except Exception as e:  # noqa: BLE001 (a model vLLM will explain itself)
        size = int(KV_SHARE_OF_AVAILABLE * available)
        return ["--kv-cache-memory-bytes", str(size)], (
            f"KV cache {_gib(size)} GiB, {KV_SHARE_OF_AVAILABLE:.0%} of the "
            f"{_gib(available)} GiB available now (the model's size per token is unknown: "
            f"{type(e).__name__}: {e}); choose with --kv-cache-memory-bytes")
    size, why = choose_kv_cache_bytes(per_token, model.max_model_len, seqs, available,
                                      engine.block_size or CPU_BLOCK_SIZE)
    return ["--kv-cache-memory-bytes", str(size)], (
        f"KV cache {_gib(size)} GiB: {why}, at {per_token / 1024:.1f} KiB per token "
        f"({shape}); vLLM's default reserves {CacheConfig.gpu_memory_utilization:.0%} of "
        f"the machine's memory whatever else runs. Choose with --kv-cache-memory-bytes, "
        f"VLLM_CPU_KVCACHE_SPACE (GiB) or --gpu-memory-utilization")


def _available_memory() -> int:
    """What vLLM's CPU worker will find available: its memory node's."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        return int(get_memory_node_info(get_allowed_cpu_list()[0].numa_node).available_memory)
    except Exception:  # noqa: BLE001
        import psutil

        return int(psutil.virtual_memory().available)


def main(argv: list[str]) -> int:
    try:
        vllm_argv, env = plan(argv)
        os.environ.update(env)
        if _cpu_only():
            from atlas_rl import machine

            machine.reuse_freed_memory()  # vLLM's engine core inherits it
            flags, line = size_kv_cache(vllm_argv)
            vllm_argv += flags
            if line:
                print(f"atlas-rl serve: {line}", file=sys.stderr, flush=True)
    except ServeError as e:
        print(f"atlas-rl serve: {e}", file=sys.stderr)
        return 2
    from atlas_rl.compat import run_vllm_cli

    return run_vllm_cli(vllm_argv)


# --- the guard (in vLLM's API server process) -------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def check_generation(path: str, body: dict, settings: dict) -> None:
    """Refuse what vLLM would take badly or what exceeds this server's bounds."""
    if not isinstance(body, dict):
        raise _Reject(400, f"the request body must be a JSON object, got "
                           f"{type(body).__name__}")
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise _Reject(400, f"prompt is empty ({prompt!r}): send a string, a list of "
                               f"strings, or token ids")
        if isinstance(prompt, list) and any(p == "" or p == [] for p in prompt):
            raise _Reject(400, "prompt holds an empty prompt: drop it or give it text")
    else:
        messages = body.get("messages")
        if not messages:
            raise _Reject(400, f"messages is empty ({messages!r}): send at least one message")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _Reject(400, f"n must be an integer >= 1 (completions per prompt), got {n!r}")
    if n > settings["max_n"]:
        raise _Reject(400, f"n = {n} exceeds this server's limit {settings['max_n']} "
                           f"(atlas-rl serve --max-n)")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _Reject(400, f"{field} must be an integer >= 1, got {value!r}")
        if value > settings["max_tokens_limit"]:
            raise _Reject(400, f"{field} = {value} exceeds this server's limit "
                               f"{settings['max_tokens_limit']} (atlas-rl serve "
                               f"--max-tokens-limit)")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise _Reject(400, f"temperature must be a number >= 0 (0 = greedy), got "
                           f"{temperature!r}")


def confine(directory, root: str | None) -> str:
    """The directory a state request names, resolved under `root` (the server's state
    root, resolved at start): a relative path resolves under it; after symlinks are
    resolved the path must be `root` or inside it. Raises `_Reject` (400) naming the root."""
    if root is None:
        raise _Reject(400, "this server saves and loads speculator state only under a "
                           "directory named at its start, and none was: start it with "
                           "--state-root DIR (or --state-dir DIR, the default root)")
    if not isinstance(directory, str) or not directory or "\0" in directory:
        raise _Reject(400, f"'directory' must be a path under this server's state root "
                           f"{root!r} (relative paths resolve under it), got {directory!r}")
    resolved = os.path.realpath(os.path.join(root, directory))  # absolute: root is dropped
    if os.path.commonpath([root, resolved]) != root:
        raise _Reject(400, f"directory {directory!r} resolves to {resolved!r}, outside this "
                           f"server's state root {root!r}: name a path under it (relative "
                           f"paths resolve under it; atlas-rl serve --state-root)")
    return resolved


class AtlasGuard:
    """Pure ASGI middleware (module docstring); vLLM loads it with ``--middleware``."""

    def __init__(self, app):
        self.app = app
        raw = os.environ.get(ENV)
        self.settings = dict(DEFAULTS, max_body_bytes=int(DEFAULTS["max_body_mb"] * (1 << 20)),
                             api_key_sha256=None, weight_transfer=None, state_root=None)
        if raw:
            self.settings.update(json.loads(raw))
        self.state_root = _realpath(self.settings["state_root"])
        digest = self.settings.get("api_key_sha256")
        self.key_digest = bytes.fromhex(digest) if digest else None

    # -- helpers
    def _authorized(self, scope) -> bool:
        if self.key_digest is None:
            return True
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given = hashlib.sha256(token.strip().encode()).digest()
                    return secrets.compare_digest(given, self.key_digest)
        return False

    @staticmethod
    async def _respond(send, status: int, content: dict) -> None:
        body = json.dumps(content).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = int(self.settings["max_body_bytes"])
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _Reject(413, self._too_large(int(value)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Reject(413, self._too_large(size))
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _too_large(self, size: int) -> str:
        limit = self.settings["max_body_bytes"]
        return (f"request body of {size} bytes exceeds this server's limit of {limit} bytes "
                f"(atlas-rl serve --max-body-mb)")

    # -- the middleware
    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "").removeprefix(scope.get("root_path", "") or "")
        if (path not in OPEN_PATHS and scope.get("method") != "OPTIONS"
                and not self._authorized(scope)):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            return await self._respond(send, 401, {"error": (
                "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the "
                "server was started with (atlas-rl serve --api-key)")})
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            if path == "/atlas/stats":
                return await self._state(scope, send, path, {})
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                return  # the client left before sending its request
            if path in GENERATION_PATHS or path in STATE_RPC or path in WEIGHT_PATHS \
                    or path == RPC_PATH:
                try:
                    payload = json.loads(body or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise _Reject(400, f"the request body is not valid JSON ({e}): send a "
                                       f"JSON object") from None
                if path in GENERATION_PATHS:
                    check_generation(path, payload, self.settings)
                elif path in STATE_RPC:
                    return await self._state(scope, send, path, payload)
                elif path == RPC_PATH:
                    confined = self._confine_rpc(payload, body)
                    if confined is not body:
                        body = confined
                        headers = [(k, v) for k, v in scope.get("headers") or ()
                                   if k != b"content-length"]
                        scope = dict(scope, headers=[*headers, (b"content-length",
                                                                str(len(body)).encode())])
                elif self.settings.get("weight_transfer") == "atlas_files":
                    return await self._weights(scope, send, path, payload)
        except _Reject as e:
            return await self._respond(send, e.status, {"error": e.message})
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, which vLLM watches

        return await self.app(scope, replay, send)

    async def _weights(self, scope, send, path, payload):
        from vllm.distributed.weight_transfer.base import (
            WeightTransferInitRequest,
            WeightTransferUpdateRequest,
        )

        from atlas_rl.backends.vllm.weight_transfer import REFUSED

        engine = scope["app"].state.engine_client
        if not isinstance(payload, dict):
            raise _Reject(400, "the request body must be a JSON object")
        try:
            if path == "/init_weight_transfer_engine":
                await engine.init_weight_transfer_engine(
                    WeightTransferInitRequest(init_info=payload.get("init_info") or {}))
                return await self._respond(send, 200, {"message": "Weight transfer initialized"})
            if path == "/update_weights":
                if "update_info" not in payload:
                    raise _Reject(400, "missing 'update_info' (what TRL's client sends)")
                await engine.update_weights(
                    request=WeightTransferUpdateRequest(update_info=payload["update_info"]))
                return await self._respond(send, 200, {"message": "Weights staged"})
            # the load: between requests, never inside one (module docstring)
            paused_here = not await engine.is_paused()
            if paused_here:
                await engine.pause_generation(mode="wait", clear_cache=True)
            try:
                await engine.finish_weight_update(payload.get("weight_version"))
            finally:
                if paused_here:
                    await engine.resume_generation()
            return await self._respond(send, 200, {"message": "Weight update finished"})
        except _Reject:
            raise
        except Exception as e:  # noqa: BLE001 (vLLM relays the worker's error as text)
            message = worker_message(str(e))
            status = 422 if REFUSED in message else 409 if "start_weight_update" in message \
                else 500
            if status == 500:
                logger.exception("atlas-rl: %s failed", path)
            return await self._respond(send, status, {"error": message})

    def _confine_rpc(self, payload, body: bytes) -> bytes:
        """vLLM's ``/collective_rpc`` reaches the same worker methods: their directory
        is confined the same way, and the worker gets the resolved one."""
        if not isinstance(payload, dict) or payload.get("method") not in PATH_METHODS:
            return body
        args, kwargs = payload.get("args") or [], payload.get("kwargs") or {}
        if isinstance(args, list) and args:
            payload["args"] = [confine(args[0], self.state_root), *args[1:]]
        elif isinstance(kwargs, dict) and "directory" in kwargs:
            payload["kwargs"] = dict(kwargs, directory=confine(kwargs["directory"],
                                                               self.state_root))
        else:
            raise _Reject(400, f"{payload['method']} needs a directory under the server's "
                               f"state root {self.state_root!r}")
        return json.dumps(payload).encode()

    async def _state(self, scope, send, path, payload):
        engine = scope["app"].state.engine_client
        method = STATE_RPC[path]
        args: tuple = ()
        if method in PATH_METHODS:
            directory = payload.get("directory") if isinstance(payload, dict) else None
            if not isinstance(directory, str) or not directory:
                raise _Reject(400, f"{path} needs {{\"directory\": PATH}} (a directory under "
                                   f"the server's state root {self.state_root!r})")
            args = (confine(directory, self.state_root),)
        elif method == "atlas_learn":
            args = (None, True)
        try:
            out = await engine.collective_rpc(method, args=args)
        except Exception as e:  # noqa: BLE001
            message = worker_message(str(e))
            status = 404 if "does not speculate with atlas" in message else \
                400 if method == "atlas_load" else 500
            return await self._respond(send, status, {"error": message})
        return await self._respond(send, 200, {"result": out[0] if out else None})
