# Every command a person needs. `make demo` and `make test` set everything up first.
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo up test lint typecheck unit integration proto proto-check bench-retrieval clean image image-smoke

setup:
	@./scripts/setup.sh

demo: setup  ## the stack plus a TIL for examples/sample.diff
	$(VENV)/bin/til demo

up: setup  ## the four services with embedded defaults; Ctrl-C stops them
	$(VENV)/bin/til up

# CI's fuzz: 1,000 requests per RPC and strategy (tests/unit/test_fuzz.py; about 3 minutes on 2 cores).
test: export TILSERVE_FUZZ_EXAMPLES ?= 1000
test: setup lint  ## what CI runs
	$(PY) -m pytest -ra --durations=15

unit: setup
	$(PY) -m pytest -ra tests/unit

integration: setup
	$(PY) -m pytest -ra tests/integration

lint: setup proto-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --exit-code > /dev/null

typecheck: setup
	$(VENV)/bin/mypy services

proto: setup  ## regenerate gen/ from protos/
	./scripts/gen_protos.sh

proto-check: setup  ## fail if gen/ differs from what protos/ generate
	@tmp=$$(mktemp -d) && ./scripts/gen_protos.sh $$tmp && diff -r -x __pycache__ $$tmp/til gen/til > /dev/null \
	  || { echo "gen/ is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; rm -rf $$tmp

bench-retrieval: setup  ## retrieval quality (recall@5, MRR) and search latency at 10k/100k documents
	$(PY) -m bench.retrieval

image:  ## the cpu image tilserve-cpu:dev with buildah, no daemon (deploy/k8s/README.md)
	./scripts/image_build.sh

image-smoke: setup  ## the four services from that image as overlays/dev runs them; streams a TIL through the edge
	$(PY) scripts/image_smoke.py

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
