# ct-zeroshot: set-up and main commands. Every target creates the virtual environment first.
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
TEST_WORKERS ?= 2

.PHONY: study study-v2 study-v3 study-v4 venv lint test test-slow soak image test-image demo corpus corpus-v2 corpus-v3 corpus-v3-12k recipe demo-model bench-onnx bench-stages voxel-signal bench-batch bench-engines merlin-check clean

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
# much of the suite waits on subprocesses, Orthanc and listeners, so two workers overlap the waits.
test: venv
	$(BIN)/python -m pytest -m "not slow and not image" -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)

# The main job on the embedded default: a few synthetic DICOM studies through the MONAI Deploy
# application with the embedded demo model; prints each SR's findings beside the ground truth.
demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/ct-zeroshot-train synth $(DEMO_DIR)/corpus --studies 4 --seed 7 --dicom --corpus-version 2 --quiet > /dev/null
	ulimit -s 32768; $(BIN)/python -m operators -i $(DEMO_DIR)/corpus/dicom -o $(DEMO_DIR)/sr
	$(BIN)/ct-zeroshot report $(DEMO_DIR)/sr --labels $(DEMO_DIR)/corpus/zero_shot_findings_disease_cls.csv --present-only
	@echo; echo "SRs (Comprehensive 3D SR, TID 1500): $(DEMO_DIR)/sr"

# The synthetic corpus the cpu-tiny results in the README use (4,000 tiny studies, 2,456 for training).
corpus: venv
	$(BIN)/ct-zeroshot-train synth data/synth-4k --studies 4000 --seed 0

# The corpus version 2 (conspicuous focal findings) that cpu-small-v2 and the demo model use.
corpus-v2: venv
	$(BIN)/ct-zeroshot-train synth data/synth-4k-v2 --studies 4000 --seed 0 --workers 2 --corpus-version 2

# The corpus version 3 (every focal finding spans several 5 mm voxels): the learning recipe's.
corpus-v3: venv
	$(BIN)/ct-zeroshot-train synth data/synth-4k-v3 --studies 4000 --seed 0 --workers 2 --corpus-version 3

# The recipe's corpus (12,000 studies, version 3; contains corpus-v3's 4,000): the v4 sampler study's.
corpus-v3-12k: venv
	$(BIN)/ct-zeroshot-train synth data/synth-12k-v3 --studies 12000 --seed 0 --workers 2 --corpus-version 3

# The CPU recipe from a fresh 12,000-study corpus to a model package, timed (runs/recipe/recipe.json and
# the run's config, validation curve and metrics copied to results/recipe/). The gap to the supervised
# reference is measured against results/recipe/probe.json (the same image tower, steps and corpus: 24 more
# CPU minutes to remake; `recipe` without --no-supervised does). About 30 minutes on a 2-core CPU.
recipe: venv
	$(BIN)/ct-zeroshot-train recipe --out runs/recipe --preset cpu-small --no-supervised --reference results/recipe/probe.json
	mkdir -p results/recipe && cp runs/recipe/recipe.json runs/recipe/run/config.yaml runs/recipe/run/val.csv \
		runs/recipe/run/metrics.json results/recipe/

# The embedded demo model (operators/models/demo): cpu-small-v2 on corpus version 2, exported with
# validation thresholds (findings below the AUROC floor not assessed) and prompt embeddings only
# (the MiniLM text encoder would add 90 MB to the repository). About 20 minutes on a 2-core CPU.
DEMO_RUN ?= runs/demo-model
demo-model: venv
	@test -d data/synth-4k-v2 || $(MAKE) corpus-v2
	$(BIN)/ct-zeroshot-train train --data data/synth-4k-v2 --out $(DEMO_RUN) --preset cpu-small-v2
	$(BIN)/ct-zeroshot-train evaluate --run $(DEMO_RUN) --data data/synth-4k-v2 --quiet > /dev/null
	$(BIN)/ct-zeroshot-train evaluate --run $(DEMO_RUN) --data data/synth-4k-v2 --checkpoint init --quiet > /dev/null
	rm -rf $(DEMO_RUN)/package operators/models/demo
	$(BIN)/ct-zeroshot-train export --run $(DEMO_RUN) --data data/synth-4k-v2 --out $(DEMO_RUN)/package \
		--thresholds validation --text none --name ct-zeroshot-demo --model-version 0.3.1
	mkdir -p operators/models && cp -r $(DEMO_RUN)/package operators/models/demo

# The sampler study on the learning recipe (12 arms x 3 seeds, sized to ~130-150 minutes of both cores):
# results/study-paper-cpu-v2. Resumable: run it again with the same command to continue.
study-v2: venv
	@test -d data/synth-4k-v2 || $(MAKE) corpus-v2
	$(BIN)/ct-zeroshot-train study --preset paper-cpu-v2 --data data/synth-4k-v2 --out results/study-paper-cpu-v2 --resume

# The sampler study where the model learns (corpus version 3, 2,500 steps per run, 12 arms x 3 seeds,
# sized to ~150 minutes of both cores): results/study-paper-cpu-v3. Resumable: rerun to continue.
study-v3: venv
	@test -d data/synth-4k-v3 || $(MAKE) corpus-v3
	$(BIN)/ct-zeroshot-train study --preset paper-cpu-v3 --data data/synth-4k-v3 --out results/study-paper-cpu-v3 --resume

# The sampler study on the recipe's 12,000-study corpus (paper-cpu-v3's arms, 3,000 steps, checkpoints kept on
# validation macro AUROC; 12 arms x 3 seeds, 136.4 minutes of both cores measured over sessions 15-16):
# results/study-paper-cpu-v4. Resumable: rerun to continue.
study-v4: venv
	@test -d data/synth-12k-v3 || $(MAKE) corpus-v3-12k
	$(BIN)/ct-zeroshot-train study --preset paper-cpu-v4 --data data/synth-12k-v3 --out results/study-paper-cpu-v4 --resume

# The early-training sampler study on a 2-core CPU (8 arms x 3 seeds; 35 minutes measured): results/study-paper-cpu.
# Interrupted? `make study STUDY_ARGS=--resume` continues and skips finished runs.
study: venv
	@test -d data/synth-4k || $(MAKE) corpus
	$(BIN)/ct-zeroshot-train study --preset paper-cpu --data data/synth-4k --out results/study-paper-cpu $(STUDY_ARGS)

# Stage timings of the application on a full-profile study (demo model and a Merlin-size encoder).
bench-stages: venv
	$(BIN)/python -m benchmarks.bench_stages --out results/bench --runs 3

# Diagnostic: each focal finding's best single-voxel AUROC on corpus v3 (results/diagnostics/voxel_signal.md).
voxel-signal: venv
	@test -d data/synth-4k-v3 || $(MAKE) corpus-v3
	$(BIN)/python -m benchmarks.voxel_signal --data data/synth-4k-v3 --out results/diagnostics

# Batch throughput with the demo model at 1 and 2 workers (results/bench/batch_throughput.md).
bench-batch: venv
	$(BIN)/python -m benchmarks.bench_batch --out results/bench --studies 96 --workers 1,2

# The local process pool against Ray actors on a local Ray cluster, 2 workers each (results/bench/batch_engines.*).
bench-engines: venv
	$(BIN)/python -m benchmarks.bench_batch --out results/bench --studies 96 --workers 2 --engines local,ray --reps 3

# Full-size Merlin image encoder on this machine: ONNX Runtime vs torch eager (results/bench).
bench-onnx: venv
	$(BIN)/python -m benchmarks.bench_onnx --out results/bench --runs 5

# The converter at Merlin's size on random weights (no official files needed); keeps the manifest.
merlin-check: venv
	$(BIN)/python -m benchmarks.merlin_stub --out cache/merlin-stub
	rm -rf cache/merlin-stub/package
	$(BIN)/ct-zeroshot-train convert-merlin --checkpoint cache/merlin-stub/merlin_random.pt \
		--text-model cache/merlin-stub/clinical-longformer --out cache/merlin-stub/package
	mkdir -p results/merlin-random && cp cache/merlin-stub/package/manifest.json results/merlin-random/

# Long tests (the full-size converter run, the listener soak); not part of `make test`.
test-slow: venv
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The listener soak test (about 5 minutes): 3 senders, studies in parts, 3 SIGKILLs, the PACS down;
# writes its counts to results/soak/listener.json (README, "The PACS listener").
soak: venv
	$(BIN)/python -m pytest -m slow tests/deploy/test_listener_soak.py $(PYTEST_ARGS)

# The deploy image and the Orthanc image of the PACS pipeline (docker/build.sh: a local Debian 12 base
# made with debootstrap when none is there, CUDA 13 from PyPI wheels). Needs a running Docker engine.
image:
	docker/build.sh

# The image tests (tests/e2e/test_image.py): the container run offline as a non-root user, batch
# inference, the MAP manifests, the compose pipeline Orthanc -> listener -> SR in Orthanc.
test-image: venv
	CT_ZEROSHOT_IMAGE_REQUIRED=1 $(BIN)/python -m pytest -m image tests/e2e/test_image.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
