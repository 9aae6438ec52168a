# Entry points of the project. `make data` prepares the benchmark, `make test` runs the tests.
# Override on the command line: make data SOURCE=/path/to/release DEST=. PYTHON=python3

PYTHON ?= python
# A folder holding the release's CL_Benchmark/ and/or generated_data/; empty: $$SAPT_DATA_SOURCE, else ../shared.
SOURCE ?=
DEST ?= .
# Extra flags for sapt.prepare_data, e.g. DATA_FLAGS=--copy or DATA_FLAGS=--verbose
DATA_FLAGS ?=

.PHONY: data verify-data test

# Link (or copy) the release into CL_Benchmark/ and generated_data/ and verify every file against the
# release's hashes; with no release anywhere, write the synthetic benchmark instead (loudly).
data:
	$(PYTHON) -m sapt.prepare_data --synthetic-if-missing --dest $(DEST) $(if $(SOURCE),--source $(SOURCE)) $(DATA_FLAGS)

# Verify what is already in CL_Benchmark/ and generated_data/ without touching it.
verify-data:
	$(PYTHON) -m sapt.prepare_data --verify-only --dest $(DEST) $(DATA_FLAGS)

test:
	$(PYTHON) -m pytest -q tests

# Further targets (demo, ...) go below.
