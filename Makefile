# normres: `make demo` sets up and runs the demo study; `make test` runs the test suite.
VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
CORES     ?= 2
# Debian packages the project uses: the real Fashion-MNIST (the offline demo's data).
DEBIAN_PACKAGES := dataset-fashion-mnist

.PHONY: setup debian demo test lint bench bench-quick gpu-check lock clean

setup: $(VENV)/.installed debian

# Re-run only when the pins or the package metadata change.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# apt as root where it can; otherwise say what is missing (the demo needs the data).
debian:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq $$missing || (apt-get update -qq && apt-get install -y -qq $$missing)) >/dev/null; \
	  else echo "note: install the Debian packages '$$missing' (sudo apt-get install $$missing) for the offline demo"; fi; \
	fi

demo: setup
	$(SNAKEMAKE) --cores $(CORES) --configfile config/demo.yaml
	@echo "report: $(CURDIR)/results/report.html"

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(SNAKEMAKE) --lint
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

bench: setup
	$(PY) benchmarks/bench.py

bench-quick: setup
	$(PY) benchmarks/bench.py --quick

# The first run on a GPU machine: device, tests/test_gpu.py, host syncs, epoch timings (< 10 min).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# Regenerate the exact pins from the current environment.
lock:
	{ echo "# Exact versions of every package in .venv (pip freeze). Regenerate with 'make lock'."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^normres'; } > requirements.lock

clean:
	rm -rf results logs .snakemake
