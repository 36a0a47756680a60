# The two set-up commands of the README. Each creates or reuses .venv with the pinned set.
PY := .venv/bin/python

.PHONY: venv bench test test-fast gpu-check selfcheck

venv:
	@bash scripts/ensure_venv.sh

## make bench: the main job, the loss benchmark on this machine's default device and shapes
## (writes a new, git-ignored benchmarks/runs/<UTC time>/; ARGS="--output-dir benchmarks/results" replaces the record)
bench: venv
	$(PY) benchmarks/bench_loss.py $(ARGS)

## make test: the whole test suite (CPU; Triton kernels through the interpreter)
test: venv
	$(PY) -m pytest -q --timeout=900 $(ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh

## make selfcheck: versions, parity of every backend against fp64 and, on CUDA, kernels, timings and the
## autotuner's choice (python -m iris_kernels.selfcheck; writes iris_kernels_selfcheck.json)
selfcheck: venv
	$(PY) -m iris_kernels.selfcheck $(ARGS)
