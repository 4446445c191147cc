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

# The Slurm tests start a real two-node cluster on this machine (slurm/testing/start_cluster.sh)
# from the distribution's packages: `make test` installs them first when they are missing and
# it can (root with apt-get); otherwise those tests skip and say why.
SLURM_PACKAGES ?= slurmctld slurmd slurm-client munge
APT_GET     := DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0

.PHONY: install pretrain prepare train test bench clean slurm-packages

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

test: install slurm-packages
	$(VENV)/bin/pytest $(PYTEST_ARGS)

slurm-packages:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
	    && command -v sbatch >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(SLURM_PACKAGES) with apt-get (for the Slurm tests)"; \
	    $(APT_GET) install --no-install-recommends $(SLURM_PACKAGES) >/dev/null \
	    || { $(APT_GET) update >/dev/null \
	         && $(APT_GET) install --no-install-recommends $(SLURM_PACKAGES) >/dev/null; } \
	    || echo "warning: could not install $(SLURM_PACKAGES): the Slurm tests will skip"; \
	else \
	    echo "note: $(SLURM_PACKAGES) missing and not installable here (needs root and apt-get):" \
	         "the Slurm tests will skip"; \
	fi

bench: install  # every benchmark in benchmarks/, each ending in its ratio line (BENCHMARKS.md)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs data .pytest_cache
