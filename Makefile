# Adaptive Depth Networks: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= resnet_mini
DATA   ?= data/digits

.DEFAULT_GOAL := help
STUDY_EPOCHS ?= 60
STUDY_SEEDS  ?= 0 1 2 3 4
STUDY_JOBS   ?= 2
FINETUNE_EPOCHS ?= 24

.PHONY: help install test test-fast demo reproduce reproduce-finetune train train-cluster system-deps bench lint clean \
	gpu-wheels gpu-check-cpu \
	mlflow-server mlflow-server-stop ray-head ray-head-stop ray-worker ray-worker-stop serve serve-stop

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-19s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with the tested pins (constraints.txt)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

TEST_WORKERS ?= 2

test: install  ## run the whole test suite in TEST_WORKERS pytest-xdist workers (default 2; one test file each at a time; 0: one process) (CPU only, daemons included; prints the 15 slowest tests)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install  ## the inner loop: every test not marked slow (no training, search or daemon; under 5 minutes)
	$(PY) -m pytest -q -m "not slow" --durations=10

demo: install  ## the whole path on the embedded digits: shards, train a small ADN into runs/demo, Pareto search on this CPU
	rm -rf data/digits
	$(PY) -m pipeline.data.shard digits --out data/digits
	rm -rf runs/demo
	DS_ACCELERATOR=cpu $(PY) -m pipeline.train --model $(MODEL) --data data/digits --output runs/demo \
		--eval-all-masks --experiment adn-demo
	$(PY) -m search.pareto --target cpu --checkpoint runs/demo --data data/digits --out runs/demo/pareto-cpu
	@echo "serve what it trained (Ray Serve, depth picked per batch to meet deadlines): make serve CHECKPOINT=runs/demo PARETO=runs/demo/pareto-cpu"

reproduce: install  ## the paper's claims on digits-hard: STUDY_SEEDS (5) x (vanilla, base alone, ADN), STUDY_EPOCHS (60) each, paired verdicts, into runs/study (48 min on 2 cores; STUDY_EPOCHS=24 STUDY_SEEDS="0 1 2": 12 min)
	test -f data/digits-hard/val.json || $(PY) -m pipeline.data.shard digits-hard --out data/digits-hard
	DS_ACCELERATOR=cpu $(PY) -m studies.paper --data data/digits-hard --model resnet_mini --epochs $(STUDY_EPOCHS) \
		--seeds $(STUDY_SEEDS) --jobs $(STUDY_JOBS) --out runs/study $(ARGS)

reproduce-finetune: install  ## a trained network converted into an ADN by fine-tunes of 0-50 % of the epochs at 3 LRs, against ADN from scratch, FINETUNE_EPOCHS (24) from scratch, into runs/finetune (36 min on 2 cores)
	test -f data/digits-hard/val.json || $(PY) -m pipeline.data.shard digits-hard --out data/digits-hard
	DS_ACCELERATOR=cpu $(PY) -m studies.finetune --data data/digits-hard --model resnet_mini \
		--epochs $(FINETUNE_EPOCHS) --lrs 0.01 0.03 0.1 --jobs $(STUDY_JOBS) --out runs/finetune $(ARGS)

train: install  ## train MODEL on the shards in DATA (one process; see pipeline.train --help for the launchers)
	$(PY) -m pipeline.train --model $(MODEL) --data $(DATA) --output runs/$(MODEL)-adn $(ARGS)

# train-cluster: LAUNCHER=slurm|ssh|local (default: slurm if sbatch is here, else ssh with a HOSTFILE, else local)
CLUSTER_FLAGS = $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(NODES),--nodes $(NODES)) \
	$(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) $(if $(ACCELERATOR),--accelerator $(ACCELERATOR)) \
	$(if $(HOSTFILE),--hostfile $(HOSTFILE)) $(if $(MASTER_ADDR),--master-addr $(MASTER_ADDR)) \
	$(if $(MASTER_PORT),--master-port $(MASTER_PORT)) \
	$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(TIME),--time $(TIME)) \
	$(if $(SBATCH_ARGS),--sbatch-args "$(SBATCH_ARGS)") $(if $(WAIT),--wait)

train-cluster: install  ## train MODEL on NODES nodes from DATA (dir or URL): LAUNCHER=slurm|ssh|local GPUS_PER_NODE HOSTFILE ARGS
	$(PY) -m pipeline.launch $(CLUSTER_FLAGS) -- --model $(MODEL) --data $(DATA) $(ARGS)

# The team's services; PIDs, logs and the local PostgreSQL live in $(CLUSTER_STATE) (default .cluster/).
MLFLOW_FLAGS = $(if $(MLFLOW_HOST),--host $(MLFLOW_HOST)) $(if $(MLFLOW_PORT),--port $(MLFLOW_PORT)) \
	$(if $(MLFLOW_DB),--db '$(MLFLOW_DB)') $(if $(MLFLOW_ARTIFACTS),--artifacts $(MLFLOW_ARTIFACTS)) \
	$(if $(MLFLOW_AUTH),--auth) $(if $(MLFLOW_INSECURE),--insecure) \
	$(if $(MLFLOW_ALLOWED_HOSTS),--allowed-hosts $(MLFLOW_ALLOWED_HOSTS))
RAY_FLAGS = $(if $(RAY_NODE_IP),--node-ip $(RAY_NODE_IP)) $(if $(RAY_CPUS),--num-cpus $(RAY_CPUS)) \
	$(if $(RAY_GPUS),--num-gpus $(RAY_GPUS)) $(if $(RAY_TEMP_DIR),--temp-dir $(RAY_TEMP_DIR))

mlflow-server: install  ## MLflow server on PostgreSQL: MLFLOW_PORT=5000 MLFLOW_HOST=127.0.0.1 MLFLOW_DB MLFLOW_ARTIFACTS MLFLOW_AUTH=1
	$(PY) -m cluster.mlflow_server start $(MLFLOW_FLAGS)

mlflow-server-stop: install  ## stop the MLflow server and the local PostgreSQL that mlflow-server started
	$(PY) -m cluster.mlflow_server stop

ray-head: install  ## Ray head node for the search, token auth on: RAY_PORT=6379 RAY_NODE_IP RAY_CPUS RAY_GPUS
	$(PY) -m cluster.ray_node head $(if $(RAY_PORT),--port $(RAY_PORT)) $(RAY_FLAGS)

ray-head-stop: install  ## stop the Ray head that ray-head started (by PID; not `ray stop`)
	$(PY) -m cluster.ray_node stop head

ray-worker: install  ## join this host to a Ray head: HEAD=HOST:PORT (token: RAY_AUTH_TOKEN_PATH or the state dir)
	$(PY) -m cluster.ray_node worker --head '$(HEAD)' $(RAY_FLAGS)

ray-worker-stop: install  ## stop the Ray worker that ray-worker started (by PID)
	$(PY) -m cluster.ray_node stop worker

# serve: the ADN behind Ray Serve in the background (python -m serving --help lists what ARGS may add)
CHECKPOINT ?= runs/demo
SERVE_FLAGS = $(if $(MODEL_URI),--model-uri '$(MODEL_URI)',--checkpoint $(CHECKPOINT)) $(if $(PARETO),--pareto $(PARETO)) \
	$(if $(SLO_MS),--slo-ms $(SLO_MS)) $(if $(REPLICAS),--replicas $(REPLICAS)) $(if $(POLICY),--policy $(POLICY)) \
	$(if $(MASK),--mask $(MASK)) $(if $(TARGET),--target $(TARGET))

serve: install  ## serve an ADN with Ray Serve on 127.0.0.1:8000: CHECKPOINT=runs/demo PARETO SLO_MS REPLICAS MODEL_URI POLICY MASK
	$(PY) -m cluster.serving start $(if $(SERVE_HOST),--host $(SERVE_HOST)) $(if $(SERVE_PORT),--port $(SERVE_PORT)) \
		-- $(SERVE_FLAGS) $(ARGS)

serve-stop: install  ## stop the server that make serve started (by PID)
	$(PY) -m cluster.serving stop

system-deps:  ## Debian packages for the cluster layer and its tests (SLURM, PostgreSQL, Chromium, ...); root
	bash cluster/system-deps.sh

bench: install  ## performance measurements that print ratios (benchmarks/)
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/dataloader.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/search_eval.py
	$(PY) benchmarks/comms.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/latency_tables.py
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/serving.py --checkpoint $(or $(SERVE_BENCH),runs/demo) --data $(or $(SERVE_DATA),data/digits) \
		--out runs/serving-bench

gpu-wheels: install  ## the cp312 wheels benchmarks/gpu.py needs on the GPU machine, into .whl/, checked offline
	bash benchmarks/gpu_wheels.sh $(PY)

gpu-check-cpu: install  ## benchmarks/gpu.py's code paths at tiny sizes on this CPU (OUT=dir, default runs/gpu-tiny)
	$(PY) benchmarks/gpu.py --device cpu --tiny --out $(or $(OUT),runs/gpu-tiny)

lint: install  ## ruff, and the layers and import cycles (import-linter contracts in pyproject.toml)
	$(PY) -m ruff check adn pipeline search serving studies cluster tests benchmarks
	$(VENV)/bin/lint-imports

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
