# branchbox: the two commands a user needs are `make run` and `make test` (Debian 12, as root).
# Every step is idempotent and skipped when nothing changed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BB := $(VENV)/bin/branchbox
DATA_DIR ?= /var/lib/branchbox
export BRANCHBOX_DATA_DIR ?= $(DATA_DIR)
# tests and benchmarks reuse the templates `make run` built (content-addressed, immutable)
export BRANCHBOX_TEST_TEMPLATES ?= $(DATA_DIR)/templates
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

# the microvm backend: QEMU (microvm machine, qemu-img), mkfs.ext4, lz4 for the kernel, busybox for the initrd,
# cpio (only the test that reads our initrd archive back)
VM_APT_PACKAGES := qemu-system-x86 qemu-utils e2fsprogs lz4 busybox-static cpio
# image import: skopeo copies images into an OCI layout. Only `make test` installs the tests' local registry,
# htpasswd, dockerd and sshd (git workspaces over ssh) (on a systemd host these packages start services; the tests
# run their own instances). openssh-client: ssh repositories of git workspaces
TEST_APT_PACKAGES := docker-registry apache2-utils docker.io openssh-server openssl
APT_PACKAGES := mmdebstrap bubblewrap busybox-static git openssh-client ca-certificates iproute2 nftables libseccomp2 \
	python3 python3-venv tar xz-utils zstd btrfs-progs skopeo $(VM_APT_PACKAGES)
BENCH_APT_PACKAGES := docker.io

.PHONY: help setup apt test-apt venv storage template run test test-fast bench soak lint format sdk clean

help:
	@echo "make run    set up (apt packages, virtualenv, default template) and start the daemon on 127.0.0.1"
	@echo "make test   same set-up, then the whole test suite"
	@echo "make bench  benchmarks with baselines (docker, bwrap, unshare) -> bench/results/"
	@echo "make soak   concurrent SDK clients against one daemon for SOAK_DURATION s (300) -> bench/results/"
	@echo "make lint   ruff + mypy strict (and the generated sync SDK up to date)"
	@echo "make sdk    regenerate src/branchbox/sdk/_sync*.py from _async*.py (unasync)"

setup: apt venv storage template

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test-apt:
	@missing=$$(for p in $(TEST_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fleet]'
	@touch $@

# a fresh data dir gets its own btrfs filesystem (a sparse file next to it): O(1) snapshots and forks
storage: apt venv
	$(BB) storage prepare --data-dir $(DATA_DIR)

template: apt venv storage
	$(BB) template build --default --data-dir $(DATA_DIR)

run: setup
	$(BB) serve --config etc/branchbox.toml --data-dir $(DATA_DIR)

test: setup test-apt
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: venv test-apt
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

bench: setup
	@missing=$$(for p in $(BENCH_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	$(PY) bench/run.py --data-dir $(DATA_DIR)

SOAK_DURATION ?= 300
SOAK_CLIENTS ?= 8
soak: setup
	$(PY) bench/soak.py --data-dir $(DATA_DIR) --duration $(SOAK_DURATION) --clients $(SOAK_CLIENTS)

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy
	$(PY) scripts/gen_sync.py --check

# the SDK is written once: _async*.py are the source, _sync*.py are generated (tests/test_sdk_generated.py checks)
sdk: venv
	$(PY) scripts/gen_sync.py

format: venv
	$(VENV)/bin/ruff format src tests bench scripts
	$(VENV)/bin/ruff check --fix src tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
