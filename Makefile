# GenLoc tasks. `make train` and `make test` create .venv on first use.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# One OpenMP thread per process: on 2 shared cores, 2 threads per process stall each other
# (measured ~10x slower steps with a data worker or a second DDP rank running beside them).
export OMP_NUM_THREADS ?= 1
export PYTHONPATH := $(CURDIR)

.PHONY: venv browser test test-fast train bench bench-gpu smoke-gpu demo clean

venv: .venv/.installed

# Exact versions from requirements/lock.txt (pyproject holds the ranges), so a fresh venv is the
# tested environment and `make train` reproduces docs/results.md. The test extra pulls in every other
# one (insert, train, demo, bench); genloc itself is installed editable, so the venv runs this checkout.
.venv/.installed: pyproject.toml requirements/lock.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip 2>/dev/null || true
	$(PY) -m pip install --quiet -c requirements/lock.txt --editable '.[test]'
	touch $@

# The demo's browser test (tests/test_demo_browser.py) drives Debian's Chromium through its driver:
# installed with apt when missing (as root); otherwise one line says what to run. A missing browser
# fails `make test` rather than skipping the test; `make test-fast` does not need it.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "make test: the browser test needs chromium and chromedriver; install them as root (Debian: apt-get install chromium chromium-driver), or run make test-fast" >&2; exit 2; fi; \
	echo "installing chromium and chromium-driver (apt-get)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null || \
		{ echo "make test: apt-get could not install chromium and chromium-driver (its error is above); install them, or run make test-fast" >&2; exit 2; }

test: venv browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

train: venv
	$(PY) -m scripts.toy_recipe

bench: venv
	$(PY) -m benchmarks.run_all

# The demo page on http://127.0.0.1:7860 (the venv's test extra includes the demo's Gradio);
# options go through ARGS, e.g. make demo ARGS="--model runs/toy_model --inpainter DIR --backend sd"
demo: venv
	$(PY) demo.py $(ARGS)

# The one GPU check (docs/gpu.md section 7), paper preset on one CUDA GPU, under 8 minutes: step times by
# decoder path at batches 64/256/largest (eager and compiled), the sync check, sampling, memory, largest
# batch, the fit loop with a profiler trace, then smoke-gpu (results/gpu_check/).
# Without a GPU: $(PY) -m benchmarks.gpu_check --quick
bench-gpu: venv
	$(PY) -m benchmarks.gpu_check

# Before a real run on a new GPU node (docs/gpu.md): paper preset at random init on toy scenes,
# bf16-mixed training with validation, evaluate.py and one insertion on CUDA; pass/fail per part.
smoke-gpu: venv
	$(PY) -m scripts.smoke_gpu

clean:
	rm -rf runs data/toy
