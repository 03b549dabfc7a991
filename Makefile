# The two commands of the README: `make run` (the main job) and `make test`.
# Both set up .venv first (idempotent; see scripts/setup.sh).
PROMPT ?= What is paged attention? Answer in two sentences.
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: setup run generate lint test bench

setup:
	@bash scripts/setup.sh

# The main job: the OpenAI-compatible server on the bundled model (Ctrl-C stops it).
run: setup
	.venv/bin/pagoda serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# One chat answer from the command line, no server.
generate: setup
	.venv/bin/pagoda generate --chat --prompt "$(PROMPT)" --max-tokens 128

# Lint, format check and type check of pagoda/ (configured in pyproject.toml), before the tests.
lint: setup
	.venv/bin/ruff check pagoda
	.venv/bin/ruff format --check pagoda
	.venv/bin/mypy

test: lint
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	.venv/bin/pagoda bench throughput --num-prompts 128 --input-len 64:512 --output-len 64:256 --compare hf --json bench-throughput.json
