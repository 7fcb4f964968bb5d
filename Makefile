# One command each, on a fresh machine: `make demo` (offline demo) and `make test` (the test suite).
# Both create the virtual environment in .venv first if it is missing or requirements.txt changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Offline demo: long-tailed digits (scikit-learn's bundled images), CE baseline then DRW, on the CPU.
demo: venv
	$(BIN)/python train.py --dataset digits --imb_factor 0.01 --loss_type CE --train_rule None \
		--epochs 30 --lr_steps 20 25 -b 64 -j 0 --seed 0 --exp_str demo --overwrite
	$(BIN)/python train.py --dataset digits --imb_factor 0.01 --loss_type LDAM --train_rule DRW \
		--epochs 30 --lr_steps 20 25 -b 64 -j 0 --seed 0 --exp_str demo --overwrite

# The whole suite, as tests/shards.py runs it: one pytest process per CPU core (at most 4), each taking
# the next test no other has taken, one OpenMP thread each; `SHARDS=1 make test` runs it in one process.
# `pytest -m "not slow"` leaves out the multi-process tests (torchrun, MoCo's per-GPU launcher,
# reproduce.py --jobs). Timings: docs/tests.md.
test: venv
	$(BIN)/python tests/shards.py -q tests

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) log checkpoint .pytest_cache
