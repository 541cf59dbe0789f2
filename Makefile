# Adaptive Depth Networks: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= resnet_mini
DATA   ?= data/digits

.DEFAULT_GOAL := help
.PHONY: help install test demo train train-cluster system-deps bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with the tested pins (constraints.txt)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install  ## run the test suite (CPU only, a few minutes)
	$(PY) -m pytest -q

demo: install  ## the whole path on the embedded digits: shards, train a small ADN into runs/demo, Pareto search on this CPU
	$(PY) -m pipeline.data.shard digits --out data/digits
	rm -rf runs/demo
	DS_ACCELERATOR=cpu $(PY) -m pipeline.train --model $(MODEL) --data data/digits --output runs/demo \
		--eval-all-masks --experiment adn-demo --run-name demo
	$(PY) -m search.pareto --target cpu --checkpoint runs/demo --data data/digits --out runs/demo/pareto-cpu

train: install  ## train MODEL on the shards in DATA (one process; see pipeline.train --help for the launchers)
	$(PY) -m pipeline.train --model $(MODEL) --data $(DATA) --output runs/$(MODEL)-adn $(ARGS)

# train-cluster: LAUNCHER=slurm|ssh|local (default: slurm if sbatch is here, else ssh with a HOSTFILE, else local)
CLUSTER_FLAGS = $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(NODES),--nodes $(NODES)) \
	$(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) $(if $(ACCELERATOR),--accelerator $(ACCELERATOR)) \
	$(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(if $(MASTER_ADDR),--master-addr $(MASTER_ADDR)) \
	$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(TIME),--time $(TIME)) \
	$(if $(SBATCH_ARGS),--sbatch-args "$(SBATCH_ARGS)") $(if $(WAIT),--wait)

train-cluster: install  ## train MODEL on NODES nodes from DATA (dir or URL): LAUNCHER=slurm|ssh|local GPUS_PER_NODE HOSTFILE ARGS
	$(PY) -m pipeline.launch $(CLUSTER_FLAGS) -- --model $(MODEL) --data $(DATA) $(ARGS)

system-deps:  ## Debian packages for the cluster layer and its tests (slurm-wlm, munge, curl, pdsh, iproute2); root
	bash cluster/system-deps.sh

bench: install  ## performance measurements that print ratios (benchmarks/)
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/dataloader.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/search_eval.py
	$(PY) benchmarks/comms.py

lint: install  ## ruff
	$(PY) -m ruff check adn pipeline search tests benchmarks

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
