# The two commands of the README: `make run` (the main job) and `make test`.
# Both set up .venv first (idempotent; see scripts/setup.sh).
PROMPT ?= What is paged attention? Answer in two sentences.
PYTEST_ARGS ?=

.PHONY: setup run test bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/pagoda generate --chat --prompt "$(PROMPT)" --max-tokens 128

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	.venv/bin/pagoda bench throughput --num-prompts 128 --input-len 64:512 --output-len 64:256 --compare hf --json bench-throughput.json
