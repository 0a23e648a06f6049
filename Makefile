# `make demo` and `make test` each do all set-up on a fresh machine, then run. Installing is a no-op once done.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Ray listens on all interfaces; tests run in a loopback-only network namespace (root: unshare -n; otherwise
# an unprivileged user namespace; if neither is allowed, plainly).
NETNS  := if unshare -n true 2>/dev/null; then echo "unshare -n"; elif unshare -rn true 2>/dev/null; then echo "unshare -rn"; fi

.PHONY: install demo test lint clean-results

$(STAMP): pyproject.toml requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel -c constraints.txt
	# torch first, from the CPU wheel; constraints.txt keeps every later install from replacing it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m wsss_ray.cli run --config jobs/configs/demo.yaml

# Two pytest-xdist workers, one test module (or group, tests/conftest.py) each at a time: much of the suite waits on
# Ray, so two overlap well on two cores. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS)

test: install
	ns="$$($(NETNS))"; \
	if [ -n "$$ns" ]; then $$ns sh -c 'ip link set lo up 2>/dev/null; $(PYTEST) $(PYTEST_ARGS)'; \
	else echo "warning: no network namespace available, running tests plainly"; $(PYTEST) $(PYTEST_ARGS); fi

lint: install
	$(PY) -m ruff check wsss_ray jobs tests bench

clean-results:
	rm -rf results
