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

# The whole suite: 370 tests, about 5 minutes on the idle 2-core CPU machine (2026-11-25). Slowest: the
# torchrun tests (tests/test_distributed.py and one each in test_train, test_moco, test_imagenet_inat:
# 9-19 s each, marked `slow`; `pytest -m "not slow"` leaves them out) and the kill/resume subprocess tests
# of tests/test_reliability.py (10-12 s each).
test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) log checkpoint .pytest_cache
