# maglev-bridge: `make demo` runs the built-in example in a throwaway VM; `make test` runs everything.
# Both install what they need (Debian packages, the virtualenv, the test kernel, Consul and Nomad).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
export MAGLEV_CACHE ?= $(HOME)/.cache/maglev-bridge
# bench/failover.py's recordings (written by the VM through boot.py --share; the picture is drawn from them)
FAILOVER_OUT ?= /tmp/maglev-bench-failover

.PHONY: venv kernel-image hashicorp lint unit real kernel test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

kernel-image:
	bash scripts/vm-kernel.sh >/dev/null

hashicorp:
	bash scripts/build-hashicorp.sh consul >/dev/null
	bash scripts/build-hashicorp.sh nomad >/dev/null

lint: venv
	$(VENV)/bin/ruff check bridge tests bench
	$(VENV)/bin/mypy bridge

unit: venv
	$(PYTEST) -q -m "not kernel and not consul and not nomad" tests

real: venv hashicorp
	$(PYTEST) -q -m "(consul or nomad) and not kernel" tests

kernel: venv kernel-image hashicorp
	$(PY) -m tests.vm.boot --timeout 3000 -- $(PYTEST) -q -m kernel tests

test: lint unit real kernel

demo: venv kernel-image
	$(PY) -m tests.vm.boot --timeout 900 -- $(PY) -m tests.demo

bench: venv kernel-image hashicorp
	$(PY) bench/plan_bench.py
	$(PY) bench/maglev_bench.py
	$(PY) bench/agreement.py
	$(PY) bench/consul_latency.py
	$(PY) -m tests.vm.boot --timeout 1500 -- $(PY) bench/apply_bench.py
	mkdir -p $(FAILOVER_OUT)
	$(PY) -m tests.vm.boot --timeout 2400 --share $(FAILOVER_OUT) -- $(PY) bench/failover.py --out $(FAILOVER_OUT)
	$(PY) bench/failover_picture.py $(FAILOVER_OUT)/maintenance-run.json docs/failover.svg

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
