"""Run a test file's ``test_*`` functions where pytest is not installed (the GPU machine
may lack it): a stand-in ``pytest`` module provides what tests/test_gpu.py uses (marks,
``skip``, ``importorskip``, ``raises``), and the output ends with a pytest-style
summary line, which scripts/gpu_check.sh reads.

    python scripts/gpu_tests_runner.py tests/test_gpu.py
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import time
import traceback
import types


class Skipped(Exception):
    pass


class _SkipIf:
    def __init__(self, condition, reason=""):
        self.condition, self.reason = bool(condition), reason

    def __call__(self, fn):
        if self.condition:
            fn.__skip_reason__ = self.reason
        return fn


class _Marks:
    """``pytest.mark.<name>``: skipif works, every other mark is a no-op decorator."""

    def __getattr__(self, name):
        if name == "skipif":
            return lambda condition, reason="": _SkipIf(condition, reason)

        def mark(*args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # used bare: @pytest.mark.gpu
            return lambda fn: fn
        return mark


def _stand_in() -> types.ModuleType:
    mod = types.ModuleType("pytest")
    mod.mark = _Marks()

    def skip(reason=""):
        raise Skipped(reason)

    def importorskip(name, *args, **kwargs):
        try:
            return importlib.import_module(name)
        except ImportError:
            raise Skipped(f"could not import {name}") from None

    @contextlib.contextmanager
    def raises(exc, match=None):
        try:
            yield
        except exc as e:
            if match is not None:
                import re
                assert re.search(match, str(e)), f"{str(e)!r} does not match {match!r}"
            return
        raise AssertionError(f"DID NOT RAISE {exc}")

    mod.skip, mod.importorskip, mod.raises = skip, importorskip, raises
    return mod


def main(path: str) -> int:
    sys.modules.setdefault("pytest", _stand_in())
    spec = importlib.util.spec_from_file_location("gpu_tests_under_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    marks = getattr(module, "pytestmark", [])
    module_skip = next((m.reason for m in (marks if isinstance(marks, list) else [marks])
                        if isinstance(m, _SkipIf) and m.condition), None)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    start = time.time()
    for name in [n for n, v in vars(module).items() if n.startswith("test_") and callable(v)]:
        fn = getattr(module, name)
        reason = module_skip or getattr(fn, "__skip_reason__", None)
        t0 = time.time()
        try:
            if reason is not None:
                raise Skipped(reason)
            fn()
            counts["passed"] += 1
            print(f"PASSED {name} ({time.time() - t0:.1f}s)", flush=True)
        except Skipped as e:
            counts["skipped"] += 1
            print(f"SKIPPED {name}: {e}", flush=True)
        except Exception:  # noqa: BLE001 (reported, the next test runs)
            counts["failed"] += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"{summary or 'no tests ran'} in {time.time() - start:.2f}s (without pytest)")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
