# Entry points of the project. `make data` prepares the benchmark, `make test` runs the tests.
# Override on the command line: make data SOURCE=/path/to/release DEST=. PYTHON=python3

PYTHON ?= python
# A folder holding the release's CL_Benchmark/ and/or generated_data/; empty: $$SAPT_DATA_SOURCE, else ../shared.
SOURCE ?=
DEST ?= .
# Extra flags for sapt.prepare_data, e.g. DATA_FLAGS=--copy or DATA_FLAGS=--verbose
DATA_FLAGS ?=

.PHONY: setup data verify-data test demo

# Link (or copy) the release into CL_Benchmark/ and generated_data/ and verify every file against the
# release's hashes; with no release anywhere, write the synthetic benchmark instead (loudly).
data:
	$(PYTHON) -m sapt.prepare_data --synthetic-if-missing --dest $(DEST) $(if $(SOURCE),--source $(SOURCE)) $(DATA_FLAGS)

# Verify what is already in CL_Benchmark/ and generated_data/ without touching it.
verify-data:
	$(PYTHON) -m sapt.prepare_data --verify-only --dest $(DEST) $(DATA_FLAGS)

test:
	$(PYTHON) -m pytest -q tests

# Install the pinned CPU stack and this package (on a GPU machine install the CUDA torch build first).
setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .

# SAPT and seq_lora in quick mode (tiny local T5, three tasks, CPU, a few minutes each), then one table.
DEMO_PRESET ?= long_t5
demo: data
	$(PYTHON) gen_script_$(DEMO_PRESET).py --quick --method sapt --run_name demo_sapt
	bash scripts/generated/demo_sapt.sh
	$(PYTHON) gen_script_$(DEMO_PRESET).py --quick --method seq_lora --run_name demo_seq_lora
	bash scripts/generated/demo_seq_lora.sh
	$(PYTHON) score.py --compare demo_sapt demo_seq_lora
