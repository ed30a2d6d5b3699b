# The two commands a new user needs: `make demo` (set up, start ComfyUI with the pack, run a shipped
# workflow on generated demo models) and `make test` (set up, run the whole suite). Both install
# everything they need on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench bench-full lint clean

setup:
	@bash scripts/setup_env.sh >/dev/null

demo: setup
	$(PY) scripts/demo.py $(ARGS)

test:
	bash scripts/run_tests.sh

test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not browser" tests

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run_all.py $(ARGS)

# Full-size Flux files (generated once into $WEIGHTSMITH_BENCH_CACHE, default ~/.cache/weightsmith-bench-full;
# ~36 GB of disk at full size): not part of `make bench` or CI. ARGS="--blocks 2+2" for a quick run.
bench-full: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/bench_full.py $(ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .demo test-artifacts .pytest_cache
