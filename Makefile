# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv, installs, runs the published OT-CFM recipe (downloads CIFAR-10 first)
#   make test    creates .venv, installs, runs the CPU/offline test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./data
OUTPUT_DIR ?= ./results/

.PHONY: install train demo test bench

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) train_cifar10.py --model=otcfm --lr=2e-4 --ema_decay=0.9999 --batch_size=128 \
		--total_steps=400001 --save_step=20000 --num_subclasses=25 --visualize=True \
		--data_dir=$(DATA_DIR) --output_dir=$(OUTPUT_DIR)

# A few minutes on a CPU: tiny UNet, a checkpoint and sample grids under results/demo/.
demo: install
	$(PY) train_cifar10.py --model=otcfm --num_channel=32 --num_res_blocks=1 --channel_mult=1,2 \
		--batch_size=16 --total_steps=201 --save_step=100 --log_step=20 --warmup=20 --ema_decay=0.99 --grid_size=16 \
		--grid_steps=20 --num_subclasses=5 --group_dir=./results/demo/group --data_dir=$(DATA_DIR) \
		--output_dir=./results/demo/ --overwrite

# One worker per logical CPU (at most 8), each single-threaded (tests/conftest.py): on 2 cores about
# twice as fast as one process with 2 threads, as the tests' tensors are too small to use a second thread.
test: install
	$(PY) -m pytest -q -n logical --maxprocesses=8 --dist=loadgroup tests

bench: install
	$(PY) bench/train_step.py --num_channel=32 --device=cpu
