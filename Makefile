# Two entry points do all the set-up: `make quickstart` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install fedmaml into it.
VENV ?= .venv
PYTHON ?= python3
# pip arguments for the torch build. The default takes the CPU wheel where one is provided locally;
# elsewhere pass e.g. TORCH_INSTALL="torch --index-url <your CUDA or CPU wheel index>".
TORCH_INSTALL ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install quickstart test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_INSTALL)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# The MOML paper's sinewave setting in miniature: MOML, LocalMOML and FO-MAML at the public code's
# step sizes and protocol, 5,000 steps, three seeds each, as one vectorized sweep (three batches);
# then their comparison (mean +- std over seeds beside the 40,000-step numbers, and the figure).
quickstart: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedmaml sweep configs/sweeps/moml_miniature.yaml --vectorize --jobs 2
	$(BIN)/fedmaml compare results/moml_miniature --metric unseen.loss --x samples

# Two pytest-xdist workers: the slowest tests mostly wait (SuperLinks, SuperNodes, round timeouts),
# so the other worker computes meanwhile (tests/conftest.py starts those first). TEST_WORKERS=0
# runs everything in this one process.
TEST_WORKERS ?= 2
test: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) .pytest_cache
