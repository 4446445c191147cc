# The two commands of the README:
#   make pretrain   set everything up, prepare the default corpus, pretrain the default GPT
#   make test       set everything up, run the whole test suite
# Both use the venv that `make install` creates.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# This machine's pip finds the local CPU build of torch 2.13.0. GPU users keep their own torch:
#   make install VENV_FLAGS=--system-site-packages   (an importable torch is never replaced)
TORCH_SPEC  ?= torch==2.13.0
VENV_FLAGS  ?=
CONFIG      ?= configs/gpt-default.yaml
NPROC       ?= 2
OVERRIDES   ?=
PYTEST_ARGS ?=

.PHONY: install pretrain prepare train test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# deepspeed ships as an sdist whose build imports torch: build it against the torch above
	# (build isolation would download a second, CUDA torch into the build environment).
	$(PY) -m pip install -q ninja numpy packaging psutil py-cpuinfo hjson msgpack pydantic
	$(PY) -c 'import deepspeed' 2>/dev/null || $(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

prepare: install
	$(VENV)/bin/pretrain prepare $(CONFIG) $(OVERRIDES)

train: install
	$(VENV)/bin/pretrain train $(CONFIG) --nproc $(NPROC) $(OVERRIDES)

pretrain: prepare train

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install  # every benchmark in benchmarks/, each ending in its ratio line (BENCHMARKS.md)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs data .pytest_cache
