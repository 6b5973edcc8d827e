# ct-zeroshot: set-up and main commands. Experiments and benchmarks are CLI commands (docs/).
#
# torch: on machines without a GPU the CPU build must be installed before the package, or the
# package's "torch>=2.3" would pull a multi-GB CUDA wheel. TORCH_SPEC is installed first; on a
# machine where PyPI's default wheel is a CUDA build, pass the CPU index, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_DIR ?= demo
PYTEST_ARGS ?=
TEST_WORKERS ?= 3

.PHONY: venv lint test test-merlin-scale test-slow gpu-check bench-load bench-quant demo docs image test-image clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_SPEC) (CPU build unless TORCH_PIP_ARGS says otherwise)"; \
		$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[train,dev,ray]"
	@$(BIN)/python -c "import shutil, torch; gpu = shutil.which('nvidia-smi'); \
		cuda = torch.version.cuda; print(f'torch {torch.__version__} (cuda {cuda})'); \
		exit(1 if (cuda and not gpu) else 0)" || \
		(echo "a CUDA build of torch was installed on a machine without a GPU; see TORCH_PIP_ARGS" && exit 1)
	touch $@

venv: $(BIN)/.installed

# Lint, format and type checks (CI runs these before the tests).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The test suite (what CI runs). pytest exits non-zero on failures and with 5 when no test ran.
# TEST_WORKERS pytest-xdist workers, each test file on one worker (its module fixtures built once);
# much of the suite waits on subprocesses, Orthanc and listeners, so three workers overlap the waits even on
# two cores (TEST_WORKERS=2 takes about a quarter longer there).
test: venv
	$(BIN)/python -m pytest -m "not slow and not image and not merlin_scale and not long" -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)

# The end-to-end runs of minutes: the README's quick starts verbatim, the smoke study killed and resumed,
# the CPU recipe at test size. CI runs them beside make test.
test-long: venv
	$(BIN)/python -m pytest -m long -n $(TEST_WORKERS) --dist loadfile --durations=10 $(PYTEST_ARGS)

# The merlin preset's path on the CPU: torchrun on 2 gloo processes, a slow rank, fine-tuning from a
# Merlin-shaped checkpoint, the GPU check at small sizes, training on a corrupted release. Each test starts
# its own processes or holds a full-width model, so one at a time.
test-merlin-scale: venv
	$(BIN)/python -m pytest -m merlin_scale $(PYTEST_ARGS)

# On a GPU machine: the Merlin-scale figures (training step in bf16, ORT CUDA parity, DICOM -> SR latency)
# in one JSON (benchmarks/gpu_check.py; make test-merlin-scale runs it at small sizes on the CPU).
gpu-check: venv
	$(BIN)/python -m benchmarks.gpu_check --out results/gpu-check.json

# The listener under load: 20 full-size studies from 3 concurrent senders, at 1 and 2 workers, with the
# embedded demo model; studies/hour, latency p50/p95, peak memory (results/bench/load.*, docs/pacs.md).
bench-load: venv
	$(BIN)/python -m benchmarks.bench_load --out results/bench --studies 20 --senders 3 --workers 1,2 --profile full

# The int8 image encoder against the float one on the CPU: Merlin's full-size encoder, ONNX Runtime and
# OpenVINO, latency and throughput side by side (results/bench/quant.*, docs/cpu.md). INT8_PACKAGE (a
# `ct-zeroshot-train quantize` of FLOAT_PACKAGE, the demo model by default) adds the pair's figures.
FLOAT_PACKAGE ?= operators/models/demo
bench-quant: venv
	$(BIN)/python -m benchmarks.bench_quant --out results/bench $(if $(INT8_PACKAGE),--package $(FLOAT_PACKAGE) --int8-package $(INT8_PACKAGE))

# The long tests: the full-size Merlin conversion and the listener soak (docs/pacs.md).
test-slow: venv
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# A few synthetic DICOM studies (corpus version 3, what the embedded demo model was trained on) through the
# MONAI Deploy application with that model; prints each SR's findings beside what each phantom really holds.
demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/ct-zeroshot-train synth $(DEMO_DIR)/corpus --studies 4 --seed 7 --dicom --corpus-version 3 --quiet > /dev/null
	ulimit -s 32768; $(BIN)/python -m operators -i $(DEMO_DIR)/corpus/dicom -o $(DEMO_DIR)/sr
	$(BIN)/ct-zeroshot report $(DEMO_DIR)/sr --truth $(DEMO_DIR)/corpus/ground_truth.jsonl --present-only
	@echo; echo "SRs (Comprehensive 3D SR, TID 1500): $(DEMO_DIR)/sr"

# The guides (docs/, MkDocs) into site/; --strict fails on a broken link or a page missing from the nav.
docs: venv
	$(BIN)/mkdocs build --strict --site-dir site

# The deploy image and the Orthanc image of the PACS pipeline (docker/build.sh: a local Debian 12 base
# made with debootstrap when none is there, CUDA 13 from PyPI wheels). Needs a running Docker engine.
image:
	docker/build.sh

# The image tests (tests/e2e/test_image.py): the container run offline as a non-root user, batch
# inference, the MAP manifests, the compose pipeline Orthanc -> listener -> SR (and maps) in Orthanc, and
# the maps opened in its OHIF viewer by headless Chromium (screenshots in build/test-artifacts/).
test-image: venv
	CT_ZEROSHOT_IMAGE_REQUIRED=1 $(BIN)/python -m pytest -m image tests/e2e/test_image.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) site .pytest_cache
