# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the suite).
# pyproject.toml states ranges; constraints.txt pins torch/torchvision to the releases that
# install from local disk here (-c pins versions, it adds no packages).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIN    := -c constraints.txt
DEMO_ARGS ?=

.PHONY: demo demo-lm test install install-dev data data-lm lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q $(PIN) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q $(PIN) -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Fashion-MNIST from Debian's package (70k images, no download at run time).
data:
	@bash scripts/get-data.sh

data-lm:
	@bash scripts/get-data.sh lm

demo: install-dev data
	$(VENV)/bin/kdkit demo $(DEMO_ARGS)

# A tiny Llama distilled on the Python docs' reST sources (Debian python3.11-doc).
demo-lm: install-dev data-lm
	$(VENV)/bin/kdkit demo lm $(DEMO_ARGS)

test: install-dev data
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check kdkit tests benchmarks
	$(VENV)/bin/ruff format --check kdkit tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache runs
