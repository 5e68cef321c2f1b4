"""`atlas-rl serve` beside others on one machine: the weight-transfer directories a server
owns (removed at its exit; what a SIGKILL left, removed by the next start, never a live
one's), state paths confined under the state root, and a KV cache sized to fit beside a
trainer. Real vLLM (CPU) on 127.0.0.1, the tiny model; two server starts in all, shared
by the module's server checks, and stopped by them."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from atlas_rl.backends.vllm import serve
from atlas_rl.backends.vllm import weight_transfer as wt
from tests.test_serve import Server, _error_text

GiB = 1 << 30
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
            "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_ENV and k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- state paths (no server) -------------------------------------------------------------


def test_state_paths_resolve_under_the_root_only(tmp_path):
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside)
    (root / "link-in").symlink_to(root / "inside")
    root = os.path.realpath(root)
    ok = {"ckpt": f"{root}/ckpt", "inside/a/b": f"{root}/inside/a/b",
          f"{root}/inside": f"{root}/inside", ".": root, "inside/../ckpt": f"{root}/ckpt",
          "link-in/x": f"{root}/inside/x"}
    for given, want in ok.items():
        assert serve.confine(given, root) == want, given
    refused = ["..", "../outside", "inside/../../outside", str(outside), "/etc",
               "link-out", "link-out/x", root + "-sibling", "", "a\0b", 3, None]
    for given in refused:
        with pytest.raises(serve._Reject) as e:
            serve.confine(given, root)
        assert e.value.status == 400 and repr(root) in e.value.message, (given, e.value.message)
    with pytest.raises(serve._Reject, match="start it with --state-root DIR"):
        serve.confine("ckpt", None)  # no root named at start: nothing is taken


def test_the_state_root_is_the_flag_or_the_state_dir(tmp_path):
    def root(*argv):
        return json.loads(serve.plan(["M", *argv], environ={})[1][serve.ENV])["state_root"]

    assert root() is None
    assert root("--state-dir", str(tmp_path / "s")) == os.path.realpath(tmp_path / "s")
    assert root("--set", f"state_dir={tmp_path / 's'}") == os.path.realpath(tmp_path / "s")
    assert root("--state-dir", str(tmp_path / "s"), "--state-root", str(tmp_path)) == \
        os.path.realpath(tmp_path)
    assert root("--speculation", "none", "--state-root", "rel") == os.path.realpath("rel")


# --- the KV cache (no server) ------------------------------------------------------------


def test_kv_cache_is_what_the_model_needs_within_a_share_of_the_free_memory():
    per_token, length, seqs = 46080, 1024, 128  # SmolLM2-135M in float32
    need = per_token * length * seqs  # 5.6 GiB
    size, why = serve.choose_kv_cache_bytes(per_token, length, seqs, available=40 * GiB)
    assert size == need and "128 sequences (--max-num-seqs) of 1024 tokens" in why
    size, why = serve.choose_kv_cache_bytes(per_token, length, seqs, available=8 * GiB)
    assert size == 2 * GiB and "25% of the 8.00 GiB available now" in why
    # at least one sequence of --max-model-len (and a block): vLLM refuses less
    size, why = serve.choose_kv_cache_bytes(per_token, 32768, seqs, available=4 * GiB)
    assert size == per_token * 128 * (256 + 1) and "the least vLLM starts with" in why
    size, _ = serve.choose_kv_cache_bytes(per_token, 1000, 1, available=40 * GiB)
    assert size == per_token * 128 * (8 + 1)  # one sequence: whole blocks, and one more
    with pytest.raises(serve.ServeError, match="lower --max-model-len"):
        serve.choose_kv_cache_bytes(per_token, 32768, seqs, available=1 * GiB)


def test_the_users_kv_cache_sizing_wins():
    argv = ["serve", "M", "--port", "8000"]
    for extra, environ in ((["--kv-cache-memory-bytes", "1G"], {}),
                           (["--gpu-memory-utilization=0.5"], {}),
                           (["--gpu_memory_utilization", "0.5"], {}),
                           ([], {"VLLM_CPU_KVCACHE_SPACE": "2"})):
        assert serve.size_kv_cache(argv + extra, environ) == ([], None), (extra, environ)


# --- transfer directories (no server) ----------------------------------------------------


def _own_directory(root, conn):
    """A forked owner: makes its directory, reports it, waits to be told or killed."""
    directory = wt.default_directory(root)
    Path(directory, ".half-written.tmp").write_bytes(b"\0" * 1000)  # a partial update
    conn.send(directory)
    conn.recv()


def test_the_sweep_removes_what_dead_owners_left_and_nothing_else(tmp_path):
    fork = multiprocessing.get_context("fork")
    owners = []
    for _ in range(2):
        here, there = fork.Pipe()
        process = fork.Process(target=_own_directory, args=(str(tmp_path), there))
        process.start()
        there.close()  # the child's end: a child that fails closes it, and recv raises
        assert here.poll(60), "the owner process did not make its directory"
        owners.append((process, here.recv(), here))
    (live, live_dir, live_conn), (killed, killed_dir, _) = owners
    killed.kill()
    killed.join(10)
    me, start = os.getpid(), wt._start_time(os.getpid())
    reused = tmp_path / f"{wt.PREFIX}{me}-{start + 1}-reused00"  # our pid, not our start
    reused.mkdir()
    held = tmp_path / f"{wt.PREFIX}{killed.pid}-1-heldheld"  # dead pid, but locked:
    held.mkdir()  # an owner in another pid namespace
    import fcntl

    held_fd = os.open(held, os.O_RDONLY)
    fcntl.flock(held_fd, fcntl.LOCK_EX)
    target = tmp_path / "elsewhere"
    target.mkdir()
    untouched = [tmp_path / "atlas-rl-weights-e9d8jcmc",  # made before owners were named
                 tmp_path / f"other-{killed.pid}-1-abcdefgh",
                 tmp_path / f"{wt.PREFIX}{killed.pid}-1-aplainfile",
                 tmp_path / f"{wt.PREFIX}{killed.pid}-1-asymlink0"]
    untouched[0].mkdir()
    untouched[1].mkdir()
    untouched[2].write_text("not a directory")
    untouched[3].symlink_to(target)
    try:
        removed = wt.sweep_stale_directories(str(tmp_path))
        assert sorted(removed) == sorted([killed_dir, str(reused)])
        assert not os.path.lexists(killed_dir) and not reused.exists()
        assert os.path.isdir(live_dir) and held.is_dir() and target.is_dir()
        assert all(os.path.lexists(p) for p in untouched)
        os.close(held_fd)  # its owner died: the next sweep takes it
        assert wt.sweep_stale_directories(str(tmp_path)) == [str(held)]
        assert os.path.isdir(live_dir)  # still running: never swept
    finally:
        live_conn.send("done")
        live.join(10)
    assert wt.sweep_stale_directories(str(tmp_path)) == [live_dir]  # exited: now stale


OWNER = textwrap.dedent("""
    import sys, time
    from vllm.engine.arg_utils import EngineArgs
    from atlas_rl.backends.vllm import plugin, weight_transfer as wt
    # what `vllm serve` (trl vllm-serve) runs in its API server: the plugin's config hook
    engine_args = EngineArgs(model="m", weight_transfer_config={"backend": "atlas_files"})
    plugin.configure_weight_transfer(engine_args, atlas=False)
    print(engine_args.additional_config[wt.CONFIG_KEY]["directory"], flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
""")


@pytest.mark.slow
def test_the_plugins_directory_goes_with_its_process_exit_or_sigterm(tmp_path):
    """The plugin makes the directory in the process that builds the engine config (vLLM's
    API server under `vllm serve` / `trl vllm-serve`); it goes when that process exits,
    normally or by SIGTERM (which still kills it, as before)."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    import atlas_rl  # the child imports the atlas_rl under test, not whichever is installed

    here = os.path.dirname(os.path.dirname(atlas_rl.__file__))
    env = _child_env(PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH"))
                                                if p))
    procs = {how: subprocess.Popen([sys.executable, str(script), how], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for how in ("exit", "wait")}
    try:
        dirs = {how: p.stdout.readline().strip() for how, p in procs.items()}
        assert all(d.startswith(f"{wt.default_root()}/{wt.PREFIX}") for d in dirs.values()), dirs
        assert os.path.isdir(dirs["wait"])
        procs["wait"].send_signal(signal.SIGTERM)
        codes = {how: p.wait(timeout=60) for how, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    assert codes == {"exit": 0, "wait": -signal.SIGTERM}
    assert not os.path.exists(dirs["exit"]) and not os.path.exists(dirs["wait"])


# --- real servers: one killed mid-update, the next started beside a trainer -------------


HOG = "import sys; b = b'\\x01' * int(sys.argv[1]); print('ready', flush=True); sys.stdin.read()"


def _meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def _hold_half_the_memory():
    """A child holding about half the machine's memory, every page touched (a trainer
    beside the server); (None, why) where that would leave under 6 GiB available."""
    info = _meminfo()
    size = info["MemTotal"] // 2
    if info["MemAvailable"] - size < 6 * GiB:
        return None, (f"holding half of the {info['MemTotal'] / GiB:.1f} GiB would leave "
                      f"{(info['MemAvailable'] - size) / GiB:.1f} GiB available, under the "
                      f"6 GiB the check needs for the server and the machine")
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(size)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert hog.stdout.readline().strip() == "ready"
    return hog, f"{size / GiB:.1f} GiB held"


def _server_info(server) -> dict:
    import urllib.request

    request = urllib.request.Request(server.base + "/server_info?config_format=json")
    if server.key:
        request.add_header("Authorization", f"Bearer {server.key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["vllm_config"]


def _transfer_dir(server) -> str:
    return _server_info(server)["additional_config"][wt.CONFIG_KEY]["directory"]


@pytest.fixture(scope="module")
def restarted(tiny_model_path, tmp_path_factory):
    """A server on the plugin's path (`trl vllm-serve`'s command line: NCCL asked, the
    plugin swaps in atlas_files and makes the directory) killed with SIGKILL mid-update;
    then `atlas-rl serve` with a state directory and no KV cache size, started beside a
    process holding half the machine's memory (released after the KV check)."""
    from atlas_rl.backends.vllm.plugin import speculative_config

    tmp = tmp_path_factory.mktemp("reliability")
    killed = Server(tiny_model_path, _free_port(), tmp, key=None, name="killed",
                    env=_child_env(VLLM_SERVER_DEV_MODE=1, VLLM_CPU_KVCACHE_SPACE=1))
    killed.cmd = [sys.executable, "-m", "atlas_rl.cli", "vllm", "serve", tiny_model_path,
                  "--host", "127.0.0.1", "--port", str(killed.port), "--dtype", "float32",
                  "--enforce-eager", "--max-model-len", "512",
                  "--weight-transfer-config", json.dumps({"backend": "nccl"}),
                  "--speculative-config", json.dumps(speculative_config())]
    with killed:
        killed_dir = _transfer_dir(killed)
        probe = wt.write_probe(killed_dir)
        assert killed.request("/init_weight_transfer_engine",
                              {"init_info": {"probe": probe}})[0] == 200
        assert killed.request("/start_weight_update", {})[0] == 200
        import torch

        chunks = wt.write_chunks(killed_dir, [("model.layers.0.mlp.up_proj.weight",
                                               torch.zeros(256, 128)),
                                              ("model.layers.1.mlp.up_proj.weight",
                                               torch.zeros(256, 128))], chunk_bytes=1)
        _, info = next(chunks)
        status, answer = killed.request("/update_weights", {"update_info": info})
        assert status == 200, answer  # staged; the next chunk is on its way:
        next(chunks)
        Path(killed_dir, ".half-written.safetensors.tmp").write_bytes(b"\0" * 4096)
        killed.stop(signal.SIGKILL)  # (and removes vLLM's own shared memory it leaves)
    left = sorted(os.listdir(killed_dir))

    state = tmp / "state"
    hog, hog_why = _hold_half_the_memory()
    server = Server(tiny_model_path, _free_port(), tmp, "--state-dir", str(state),
                    env=_child_env(), name="restarted")  # --max-model-len 1024, no KV size
    try:
        server.start()
        yield types.SimpleNamespace(server=server, model=tiny_model_path, state=state,
                                    tmp=tmp, hog=hog,
                                    hog_why=hog_why, killed_dir=killed_dir, left=left)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        server.stop()


@pytest.mark.slow
def test_a_server_killed_mid_update_leaves_nothing_once_the_next_starts(restarted):
    server = restarted.server
    assert len(restarted.left) >= 3, restarted.left  # a staged chunk, the next, a .tmp
    assert not os.path.exists(restarted.killed_dir), os.listdir(restarted.killed_dir)
    own = _transfer_dir(server)
    # the launcher made it in the process that became vLLM's API server: its owner
    assert os.path.basename(own).startswith(f"{wt.PREFIX}{server.proc.pid}-"), own
    assert os.path.isdir(own)


@pytest.mark.slow
def test_the_kv_cache_fits_beside_a_process_holding_half_the_memory(restarted):
    if restarted.hog is None:
        pytest.skip(restarted.hog_why)
    server = restarted.server
    try:
        log = server.log_path.read_text()
        line = next((x for x in log.splitlines() if "atlas-rl serve: KV cache" in x), None)
        assert line and "at 2.0 KiB per token (2 layers x 2 KV heads x 64 x float32" in line, \
            log[-3000:]
        chosen = _server_info(server)["cache_config"]["kv_cache_memory_bytes"]
        assert chosen == 2048 * 1024 * 128, (chosen, line)  # 128 sequences x 1024 tokens
        status, answer = server.request("/v1/completions", {
            "model": restarted.model, "prompt": "def f(x):", "max_tokens": 8,
            "temperature": 0})
        assert status == 200 and answer["choices"][0]["text"], answer
        print(restarted.hog_why, "->", line)
    finally:
        restarted.hog.kill()
        restarted.hog.wait()
        restarted.hog = None


@pytest.mark.slow
def test_state_paths_are_confined_on_the_server(restarted):
    server, state, tmp = restarted.server, restarted.state, restarted.tmp
    root = os.path.realpath(state)
    state.mkdir(exist_ok=True)
    (tmp / "outside").mkdir(exist_ok=True)
    (state / "out").symlink_to(tmp / "outside")
    for path, body in (("/atlas/save", {"directory": str(tmp / "outside")}),
                       ("/atlas/save", {"directory": "../outside"}),
                       ("/atlas/save", {"directory": "out"}),
                       ("/atlas/load", {"directory": "/etc"}),
                       ("/collective_rpc", {"method": "atlas_save",
                                            "args": [str(tmp / "outside")]})):
        status, answer = server.request(path, body)
        assert status == 400 and repr(root) in _error_text(answer), (path, body, answer)
    assert not any((tmp / "outside").iterdir())  # nothing written through any of them
    status, answer = server.request("/atlas/save", {"directory": "ckpt"})
    assert status == 200, answer
    assert (state / "ckpt" / "atlas_config.json").is_file()
    assert server.request("/atlas/load", {"directory": str(state / "ckpt")})[0] == 200
    status, answer = server.request("/collective_rpc", {"method": "atlas_load",
                                                        "args": ["ckpt"]})
    assert status == 200, answer


@pytest.mark.slow
def test_sigterm_stops_the_server_and_removes_its_directory(restarted):
    server = restarted.server
    own = _transfer_dir(server)
    server.stop(signal.SIGTERM)  # vLLM's shutdown: a normal exit, where atexit runs
    assert not os.path.exists(own), (server.proc.returncode,
                                      server.log_path.read_text()[-2000:])
