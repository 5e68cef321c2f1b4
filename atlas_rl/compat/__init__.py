"""Version-gated, self-checking workarounds for bugs in the libraries atlas-rl stands on
(vLLM's CPU backend: `vllm_cpu`; several vLLM engines in one process: `vllm_engines`).
Their status lives in the vLLM seam's registry (`atlas_rl.backends.vllm.hooks.status`),
beside every other hook."""

from atlas_rl.compat.vllm_cpu import status as vllm_cpu_status

__all__ = ["install_vllm_fixes", "install_vllm_fixes_after_build", "run_vllm_cli",
           "vllm_cpu_status"]


def install_vllm_fixes() -> None:
    """The vLLM workarounds that must be in place before vLLM builds an engine (every
    process that builds one: the trainer's, a worker vLLM started, `atlas-rl vllm`)."""
    from atlas_rl.compat import vllm_cpu, vllm_engines

    vllm_cpu.fix_repeated_registration()
    vllm_cpu.fix_seeded_chunked_prefill()
    vllm_engines.fix_shared_parallel_state()


def install_vllm_fixes_after_build(llm) -> None:
    """The workarounds that need a built engine (the CPU kernel overrides are registered
    during worker init); `llm` is unused today and may be None (in a worker)."""
    from atlas_rl.compat import vllm_cpu

    vllm_cpu.fix_expand_kernel()


def run_vllm_cli(argv) -> int:
    """vLLM's own command line (``vllm ARGV``: `atlas-rl vllm`, and `atlas-rl serve` once it
    has chosen its flags) with the fixes in place, for vllm-cpu, whose ``vllm`` command
    fails to look up its own version (fix 5 in `vllm_cpu`)."""
    import sys

    from atlas_rl.compat import vllm_cpu

    install_vllm_fixes()
    vllm_cpu.fix_cli_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0
