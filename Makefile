# maglev-bridge: `make demo` runs the built-in example in a throwaway VM; `make test` runs everything.
# Both install what they need (Debian packages, the virtualenv, the test kernel, Consul, Nomad, Prometheus).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
export MAGLEV_CACHE ?= $(HOME)/.cache/maglev-bridge
# bench/failover.py's recordings (written by the VM through boot.py --share; the picture is drawn from them)
FAILOVER_OUT ?= /tmp/maglev-bench-failover

.PHONY: venv kernel-image host-packages hashicorp prometheus lint unit real kernel test demo bench dist clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	bash scripts/venv-nftables.sh $(VENV)
	touch $@

venv: $(VENV)/.installed

# The agent as one file for the Nomad clients (scripts/dist.py): dist/maglev-bridge-<version>-<platform>.pyz
# and its .sha256; `make dist VERSION=0.2.0` builds the same code under another version.
dist: venv
	$(PY) scripts/dist.py $(if $(VERSION),--version $(VERSION))

kernel-image:
	bash scripts/vm-kernel.sh >/dev/null

# The Debian packages of scripts/vm-kernel.sh (HOST_PACKAGES) without the kernel: `make real` runs BIRD.
host-packages:
	bash scripts/vm-kernel.sh --packages-only

hashicorp:
	bash scripts/build-hashicorp.sh consul >/dev/null
	bash scripts/build-hashicorp.sh nomad >/dev/null

# Prometheus with Consul discovery (Debian's package has none): PROMETHEUS_BIN, the PATH, the cache, or a build.
prometheus:
	bash scripts/build-prometheus.sh >/dev/null

# The import rule (pyproject.toml [tool.importlinter]): the folders follow the pipeline, the core is pure.
lint: venv
	$(VENV)/bin/ruff check bridge tests bench scripts
	$(VENV)/bin/mypy bridge
	$(VENV)/bin/lint-imports

unit: venv
	$(PYTEST) -q -m "not kernel and not consul and not nomad" tests

real: venv hashicorp prometheus host-packages
	$(PYTEST) -q -m "(consul or nomad) and not kernel" tests

# The VM's timeout only bounds a hang: under emulation on a loaded 2-core machine the kernel suite runs 2-3x
# slower than on an idle one, and 50 min still fits CI's 90 with the builds and the other suites.
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
	$(PY) bench/backend_watch.py
	$(PY) bench/metrics_bench.py
	$(PY) bench/dist_bench.py
	$(PY) bench/filter_bench.py
	$(PY) -m tests.vm.boot --timeout 1500 -- $(PY) bench/apply_bench.py
	mkdir -p $(FAILOVER_OUT)
	$(PY) -m tests.vm.boot --timeout 2400 --share $(FAILOVER_OUT) -- $(PY) bench/failover.py --out $(FAILOVER_OUT)
	$(PY) bench/failover_picture.py $(FAILOVER_OUT)/maintenance-run.json docs/failover.svg

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist
