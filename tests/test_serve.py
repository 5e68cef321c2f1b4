"""`atlas-rl serve`: the rollout server for TRL's server mode, under load, faults and bad
input; real vLLM (CPU) serving the real SmolLM2-135M on 127.0.0.1, real TRL client.
Every loop is bounded and every server is stopped by the test."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atlas_rl.backends.vllm import serve

KEY = "test-key-123"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

# A fault the test switches on from outside: while the flag file exists, every
# speculator's propose and propose_both raise (installed in each server process by sitecustomize).
FAULT_SITECUSTOMIZE = '''
import os
_flag = os.environ.get("ATLAS_RL_TEST_FAULT_FLAG")
if _flag:
    try:
        from atlas_rl.speculators import neural, suffix
        for _cls in (neural.NeuralSpeculator, suffix.SuffixSpeculator):
            def _make(original):
                def propose(self, *args, **kwargs):
                    if os.path.exists(_flag):
                        raise RuntimeError("injected speculator fault")
                    return original(self, *args, **kwargs)
                return propose
            _cls.propose = _make(_cls.propose)
            _cls.propose_both = _make(_cls.propose_both)
    except Exception:
        pass
'''


# --- the launcher and the checks (no server) -------------------------------------------


def test_binding_beyond_loopback_needs_an_api_key():
    with pytest.raises(serve.ServeError, match="--api-key"):
        serve.plan(["M", "--host", "0.0.0.0"], environ={})
    argv, env = serve.plan(["M", "--host", "0.0.0.0", "--api-key", KEY], environ={})
    assert argv[:6] == ["serve", "M", "--host", "0.0.0.0", "--port", "8000"]
    guard = json.loads(env[serve.ENV])
    assert KEY not in env[serve.ENV] and guard["api_key_sha256"]  # the hash travels only
    argv, env = serve.plan(["M", "--host", "0.0.0.0"], environ={serve.API_KEY_ENV: KEY})
    argv, env = serve.plan(["--model", "M"], environ={})  # default: loopback, no key
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert json.loads(env[serve.ENV])["api_key_sha256"] is None
    # as TRL's launcher: processed logprobs, all of them; weight transfer on (a CPU here)
    assert argv[argv.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert json.loads(argv[argv.index("--weight-transfer-config") + 1]) == {
        "backend": "atlas_files"}
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["atlas"]["speculation"] == "atlas"


def test_serve_refuses_bad_flags_with_the_fix(capsys):
    assert serve.main(["M", "--host", "10.1.2.3"]) == 2
    assert "refusing to bind '10.1.2.3' without an API key" in capsys.readouterr().err
    for argv, match in ((["M", "--api-key=x", "--middleware", "m.M"], "--middleware is set by"),
                        (["--port", "1"], "no model"),
                        (["M", "--max-n", "0"], "--max-n must be >= 1"),
                        (["M", "--set", "nonsense_field=1"], "nonsense_field")):
        with pytest.raises(serve.ServeError, match=match):
            serve.plan(argv, environ={})
    # flags atlas-rl serve does not know go to vllm serve, in order
    argv, _ = serve.plan(["M", "--dtype", "float32", "--max-model-len", "512"], environ={})
    assert argv[-4:] == ["--dtype", "float32", "--max-model-len", "512"]


@pytest.mark.parametrize("body, match", [
    ({"prompt": []}, "prompt is empty"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": ["a", ""]}, "empty prompt"),
    ({"prompt": "a", "n": 0}, "n must be an integer >= 1"),
    ({"prompt": "a", "n": 65}, "--max-n"),
    ({"prompt": "a", "max_tokens": 16385}, "--max-tokens-limit"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"prompt": "a", "temperature": -0.5}, "temperature must be a number >= 0"),
    (["not", "an", "object"], "JSON object"),
])
def test_generation_requests_are_checked_naming_the_field(body, match):
    settings = dict(serve.DEFAULTS)
    with pytest.raises(serve._Reject, match=match) as refused:
        serve.check_generation("/v1/completions", body, settings)
    assert refused.value.status == 400
    serve.check_generation("/v1/completions", {"prompt": "a", "n": 64, "max_tokens": 16384,
                                               "temperature": 0}, settings)


# --- a running server ------------------------------------------------------------------


def _shm_mapped(pgid: int | None = None) -> set[str]:
    """The files directly in /dev/shm that live processes map (those in group `pgid`
    only, if given)."""
    found = set()
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            if pgid is not None and \
                    int(stat_path.read_bytes().rsplit(b")", 1)[1].split()[2]) != pgid:
                continue
            maps = (stat_path.parent / "maps").read_text()
        except (OSError, ValueError, IndexError):
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[-1]
            if path.startswith("/dev/shm/") and path.count("/") == 3:
                found.add(path)
    return found


def _vllm_shm_left(pgid: int, before: set[str]) -> set[str]:
    """What a SIGKILL of vLLM's process group `pgid` leaves in /dev/shm that is vLLM's,
    not atlas-rl's: its message queues (``psm_*``, ~400 MB a server, mapped by the group)
    and multiprocessing's semaphores (``sem.mp-*``, made since `before`, mapped by no one).
    `Server.stop` removes them: its own killed server's."""
    queues = {p for p in _shm_mapped(pgid) if os.path.basename(p).startswith("psm_")}
    semaphores = {str(p) for p in Path("/dev/shm").glob("sem.mp-*")} - before
    return queues | semaphores


class Server:
    """`atlas-rl serve` in a child process; stopped on exit (SIGTERM, then SIGKILL)."""

    what = "atlas-rl serve"

    def __init__(self, model, port, tmp, *args, env, key=KEY, name="serve"):
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.key = key
        self.cmd = [sys.executable, "-m", "atlas_rl.cli", "serve", model, "--port", str(port),
                    "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                    "--seed", "0", *args] + (["--api-key", key] if key else [])
        self.env, self.log_path = env, Path(tmp) / f"{name}.log"
        self.proc = None

    def start(self, timeout=300.0):
        self.log = open(self.log_path, "w")
        # its own process group: vLLM's engine core and workers are children of the API
        # server, and outlive it if only it is killed
        self.semaphores_before = {str(p) for p in Path("/dev/shm").glob("sem.mp-*")}
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()  # and what it left of its group
                raise AssertionError(f"{self.what} exited ({self.proc.returncode}):\n"
                                     + self.log_path.read_text()[-4000:])
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise AssertionError(f"{self.what} did not become healthy:\n"
                             + self.log_path.read_text()[-4000:])

    __enter__ = start

    def stop(self, sig=signal.SIGTERM):
        """SIGTERM: vLLM's own shutdown. SIGKILL: the whole process group at once, as a
        supervisor (systemd, Kubernetes) kills a service: no goodbye anywhere."""
        if self.proc is None:
            return
        left = set()
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                left = _vllm_shm_left(self.proc.pid, self.semaphores_before)
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever of the group is left (SIGTERM: nothing, normally)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for path in left - _shm_mapped():  # vLLM's, not atlas-rl's: a SIGKILL leaves them
            Path(path).unlink(missing_ok=True)
        if not self.log.closed:
            self.log.close()

    def __exit__(self, *exc):
        self.stop()

    def request(self, path, body=None, key="default", raw: bytes | None = None, timeout=300):
        """(status, JSON answer)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data,
                                         headers={"Content-Type": "application/json"})
        key = self.key if key == "default" else key
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, text

    def metrics(self):
        from atlas_rl.backends.vllm.server_metrics import parse_exposition

        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as response:
            return parse_exposition(response.read().decode())

    def metrics_when(self, holds, timeout=30.0):
        """/metrics once `holds(samples)` is true, or the last read after `timeout`.
        The worker writes its snapshot every 0.5 s, and the idle learner may start an
        update in any gap of 0.25 s: a single read after a fixed sleep races both."""
        deadline = time.monotonic() + timeout
        while not holds(samples := self.metrics()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return samples


def _metric(samples, name):
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


def _error_text(answer) -> str:
    if isinstance(answer, dict):
        error = answer.get("error", answer)
        return json.dumps(error) if not isinstance(error, str) else error
    return str(answer)


@pytest.fixture
def server_env(tmp_path_factory, subprocess_env):
    site = tmp_path_factory.mktemp("fault-site")
    (site / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
    flag = site / "break-speculators"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return subprocess_env(VLLM_CPU_KVCACHE_SPACE=1, PYTHONPATH=path,
                          ATLAS_RL_TEST_FAULT_FLAG=str(flag)), flag


@pytest.mark.slow
def test_the_server_holds_under_load_faults_and_bad_input(real_model_path, server_env,
                                                          free_port, tmp_path, monkeypatch):
    """One `atlas-rl serve` (API key, state directory), then a SIGKILL and a restart:
    auth on every non-public path; bad input answered with the field and the fix and
    nothing lost; N clients x M sampled requests complete with no error; a client that
    leaves mid-request leaks nothing; weights synced through TRL's client (CPU transfer)
    give the new policy's greedy output, the drafter follows them, a bad update is a 422
    naming the parameter with the old weights kept, and an update while a request runs
    never mixes two policies in one completion; the restarted server resumes its saved
    speculators; a speculator that raises degrades to no drafts, counted in /metrics."""
    import torch
    from transformers import AutoModelForCausalLM

    env, fault_flag = server_env
    state = tmp_path / "state"
    server = Server(real_model_path, free_port, tmp_path, "--state-dir", str(state),
                    "--set", "learn_every=4", env=env)
    model = real_model_path
    with server:
        # -- auth: every path but the public ones needs the key
        for path, body in (("/v1/completions", {"model": model, "prompt": "a"}),
                           ("/update_weights", {"update_info": {}}),
                           ("/collective_rpc", {"method": "atlas_stats"}),
                           ("/atlas/save", {"directory": str(tmp_path / "x")})):
            for key in (None, "wrong"):
                status, answer = server.request(path, body, key=key)
                assert status == 401 and "--api-key" in _error_text(answer), (path, answer)
        assert server.request("/atlas/stats", key=None)[0] == 401
        with urllib.request.urlopen(server.base + "/health", timeout=5) as r:
            assert r.status == 200
        assert "vllm:num_requests_running" in str(server.metrics())

        # -- bad input: a clear error each, and the server keeps serving
        long_prompt = "word " * 1500
        cases = [
            (dict(raw=b'{"model": "x", "prompt": '), 400, "not valid JSON"),
            (dict(body={"model": model, "prompt": []}), 400, "prompt is empty"),
            (dict(body={"model": model, "prompt": long_prompt, "max_tokens": 4}), 400,
             "maximum context length is 1024"),
            (dict(body={"model": model, "prompt": "a", "temperature": -1}), 400,
             "temperature must be a number >= 0"),
            (dict(body={"model": model, "prompt": "a", "n": 0}), 400, "n must be an integer"),
            (dict(body={"model": "no-such-model", "prompt": "a", "max_tokens": 4}), 404,
             "does not exist"),
            (dict(body={"model": model, "prompt": "a", "max_tokens": 10 ** 6}), 400,
             "--max-tokens-limit"),
        ]
        seen = []
        for kwargs, status, text in cases:
            got, answer = server.request("/v1/completions", **kwargs)
            seen.append((got, _error_text(answer)[:160]))
            assert got == status and text in _error_text(answer), (kwargs.get("body"), answer)
        # a body over the bound (32 MiB by default) is refused before it is read
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(40 << 20).encode() + b"\r\n\r\n{\"prompt\": ")
            s.settimeout(30)
            reply = b""
            while b"--max-body-mb" not in reply:  # head and body may come in two segments
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            reply = reply.decode(errors="replace")
        seen.append((413, reply.split("\r\n\r\n", 1)[-1][:160]))
        assert reply.startswith("HTTP/1.1 413") and "--max-body-mb" in reply, reply[:300]
        status, answer = server.request("/v1/completions", {"model": model, "prompt": PROMPT,
                                                            "max_tokens": 8, "temperature": 0})
        assert status == 200 and len(answer["choices"]) == 1
        print("bad input ->", *seen, sep="\n  ")

        # -- load: N clients x M requests at temperature 1, none fails, all complete
        n_clients, m_requests, max_tokens = 4, 3, 32
        results, errors = [], []

        def client(i):
            for j in range(m_requests):
                start = time.perf_counter()
                status, answer = server.request("/v1/completions", {
                    "model": model, "prompt": [PROMPT, f"Question {i}.{j}: what is 7 * {j}?"],
                    "max_tokens": max_tokens, "n": 2, "temperature": 1.0,
                    "return_token_ids": True, "seed": 100 * i + j})
                if status != 200:
                    errors.append((status, answer))
                    continue
                results.append((time.perf_counter() - start, answer["choices"]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors[:3]
        assert len(results) == n_clients * m_requests
        for _, choices in results:
            assert len(choices) == 4
            for c in choices:
                assert c["finish_reason"] in ("length", "stop")
                assert c["finish_reason"] == "stop" or len(c["token_ids"]) == max_tokens

        # -- a client that leaves mid-request leaks nothing
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 600,
                           "temperature": 1.0, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                      b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 30
            while _metric(server.metrics(), "vllm:num_requests_running") < 1:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:  # closed: vLLM aborts it long before its 600 tokens
            samples = server.metrics()
            if _metric(samples, "vllm:num_requests_running") == 0 and \
                    _metric(samples, "vllm:num_requests_waiting") == 0:
                break
            assert time.monotonic() < deadline, "the abandoned request is still running"
            time.sleep(0.2)

        # -- weights through TRL's client, on the CPU transfer
        monkeypatch.setenv("ATLAS_RL_API_KEY", KEY)
        from atlas_rl.integrations.trl import enable_atlas

        enable_atlas()
        from trl.generation.vllm_client import VLLMClient

        client_ = VLLMClient(base_url=server.base, connection_timeout=10)
        client_.init_communicator(device="cpu")
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        prompt_ids = client_.generate([PROMPT], max_tokens=1, temperature=0.0)["prompt_ids"][0]

        def server_greedy(tokens=24):
            return client_.generate([PROMPT], temperature=0.0, max_tokens=tokens)[
                "completion_ids"][0]

        def policy_greedy(tokens=24):
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=tokens, pad_token_id=0)
            return out[0, len(prompt_ids):].tolist()

        old = server_greedy(200)
        assert old[:24] == policy_greedy()
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if ".mlp." in name:
                    p.add_(torch.randn_like(p) * 0.02)
        new_policy = {n: p.detach().clone() for n, p in policy.named_parameters()}

        # an update while a long request runs: the request finishes on the old weights
        box = {}
        runner = threading.Thread(target=lambda: box.update(out=server_greedy(200)))
        runner.start()
        deadline = time.monotonic() + 30
        while _metric(server.metrics(), "vllm:num_requests_running") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client_.update_model_params(policy)
        client_.reset_prefix_cache()
        runner.join(timeout=300)
        assert box["out"] == old  # one policy per completion: all old
        synced = server_greedy()
        assert synced == policy_greedy() and synced != old[:24]  # the new policy's output
        stats = server.request("/atlas/stats")[1]["result"]
        assert stats["weight_syncs"] == 1 and stats["drafter_reads_policy"] is True

        # bad updates: a 422 naming the parameter, nothing loaded (not even the good tensor
        # sent with it)
        good = ("model.layers.1.mlp.up_proj.weight", torch.zeros(1536, 576))
        bad = [("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3), "shape (3, 3)"),
               ("model.no_such.weight", torch.zeros(3), "not a parameter"),
               ("model.layers.0.mlp.down_proj.weight",
                torch.zeros(576, 1536, dtype=torch.int32), "dtype int32"),
               ("model.layers.0.mlp.down_proj.weight",
                torch.full((576, 1536), float("nan")), "NaN or inf")]
        for name, tensor, text in bad:
            meta = [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                    for n, t in (good, (name, tensor))]
            with pytest.raises(Exception, match="422") as refused:
                client_.update_named_params(meta, iter([good, (name, tensor)]))
            assert name in str(refused.value) and text in str(refused.value), refused.value
            assert "keeps serving its current weights" in str(refused.value)
            assert server_greedy() == synced
        assert not list(Path(client_.atlas_transfer_dir).iterdir())  # no file left behind
        del new_policy

        # finite weights whose activations overflow (the sync's checks cannot see it): the
        # logits are NaN, each request fails (500, counted) instead of returning tokens
        # drawn from them, and the server serves on once sound weights are back
        norm = "model.norm.weight"
        meta = [(norm, "float32", [576])]
        client_.update_named_params(meta, iter([(norm, torch.full((576,), 3e38))]))
        for temperature in (1.0, 0.0):
            status, answer = server.request("/v1/completions", {
                "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": temperature})
            assert status == 500, (temperature, answer)
        client_.update_named_params(meta, iter([(norm, policy.model.norm.weight.detach())]))
        assert server_greedy() == synced
        samples = server.metrics_when(lambda s: s.get("atlas_failed_requests_total", 0) >= 2)
        assert samples["atlas_failed_requests_total"] == 2, samples.get("atlas_failed_requests_total")
        assert samples["atlas_nonfinite_logit_rows_total"] >= 2
        assert "logits were NaN or inf" in server.log_path.read_text()

        # state: the server learnt from what it served, and saves on request
        status, answer = server.request("/atlas/learn", {})
        assert status == 200
        # (under the state root, --state-dir here: relative paths resolve under it)
        status, answer = server.request("/atlas/save", {"directory": "saved"})
        assert status == 200 and (state / "saved" / "atlas_config.json").is_file()
        status, answer = server.request("/atlas/load", {"directory": "nope"})
        assert status == 400 and "nope" in _error_text(answer) \
            and "outside this server's state root" not in _error_text(answer)
        # most of them in the gaps between requests (the server learns while idle); once
        # idle, it finishes what it was learning and leaves nothing waiting (an idle
        # update takes ~0.6 s here and may start in any gap: polled, not read once)
        before_kill = server.metrics_when(lambda s: s.get("atlas_learning_now") == 0
                                          and s.get("atlas_learning_waiting") == 0)
        assert before_kill["atlas_updates_total"] >= 1
        assert before_kill["atlas_idle_updates_total"] >= 1
        assert before_kill["atlas_idle_update_seconds_total"] > 0
        assert before_kill["atlas_learning_now"] == 0 and \
            before_kill["atlas_learning_waiting"] == 0, before_kill
        server.stop(signal.SIGKILL)  # no goodbye: the state on disk is what survives

    saved = json.loads((state / "atlas_config.json").read_text())
    # -- a corrupted state directory, or another model's: the server refuses to start
    broken = tmp_path / "broken-state"
    broken.mkdir()
    (broken / "atlas_config.json").write_text("{ not json")
    with pytest.raises(AssertionError, match=r"atlas-rl serve exited \(1\)") as refused:
        Server(real_model_path, free_port, tmp_path, "--state-dir", str(broken), env=env,
               name="broken").start()
    assert "atlas_config.json" in (tmp_path / "broken.log").read_text()

    # -- restart after SIGKILL: the saved speculators come back; then a speculator that
    # raises degrades to no drafts and is counted
    with Server(real_model_path, free_port, tmp_path, "--state-dir", str(state), env=env,
                name="restart") as server:
        # read before any request: a request's sequence is learnt in the idle time after it
        # (a new version), so the state restored is the one to compare
        deadline = time.monotonic() + 30
        while (samples := server.metrics()).get("atlas_restored") != 1.0 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert samples["atlas_restored"] == 1.0
        assert samples["atlas_published_version"] == saved["published_version"]
        plain = server.request("/v1/completions", {"model": model, "prompt": PROMPT,
                                                   "max_tokens": 48, "temperature": 0,
                                                   "return_token_ids": True})[1]
        fault_flag.write_text("on")
        try:
            status, answer = server.request("/v1/completions", {
                "model": model, "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
                "return_token_ids": True})
        finally:
            fault_flag.unlink()
        assert status == 200
        # no drafts, same tokens: the request never noticed
        assert answer["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
        samples = server.metrics_when(lambda s: s.get("atlas_speculator_errors_total", 0) > 0)
        assert samples["atlas_speculator_errors_total"] > 0
