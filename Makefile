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
		--epochs 30 --lr_steps 20 25 -b 64 -j 0 --seed 0 --exp_str demo
	$(BIN)/python train.py --dataset digits --imb_factor 0.01 --loss_type LDAM --train_rule DRW \
		--epochs 30 --lr_steps 20 25 -b 64 -j 0 --seed 0 --exp_str demo

# The whole suite: 549 tests. A clean clone's `bash .ci/run` (fresh venv, then the suite) ran 512 of them
# in 11 minutes on the 2-core CPU machine (2026-11-29, partly shared); all 549 passed in 9 min 2 s on it
# idle (fresh venv not counted). Slowest: the
# multi-process tests (torchrun, MoCo's per-GPU launcher, reproduce.py --jobs: 33 marked `slow`, 10-60 s
# each; `pytest -m "not slow"` leaves them out), the kill/resume subprocess tests of
# tests/test_reliability.py and the reproduce tables run with their README commands (15-30 s each).
test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) log checkpoint .pytest_cache
