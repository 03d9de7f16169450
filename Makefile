# make demo: the main job on a built-in default.  make test: install and test
# (the C client's tests under the sanitizers and valgrind, then pytest, ruff, mypy;
# pytest builds and runs tests/c, the broker's C under the sanitizers and a few
# seconds of each fuzz target).  make fuzz SECONDS=N: each fuzz target for N
# seconds (tests/c/Makefile).
# All install what is missing (Debian packages, a virtual environment with
# pktipc built and installed editable) and are safe to run again.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.pktipc-installed
BENCH_STAMP := $(VENV)/.pktipc-bench-installed
DEBS    := gcc g++ make pkg-config python3-venv python3-dev iproute2 libpcap-dev libzmq3-dev \
           libmsgpack-dev tcpdump tshark valgrind clang libclang-rt-14-dev llvm-14
SECONDS ?= 60

.PHONY: all deps install demo test fuzz lint bench bench-quick clean

all: install

deps:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    if [ "$$(id -u)" != 0 ]; then echo "run as root to install them" >&2; exit 1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml setup.py $(wildcard shm/*.h shm/*.c pktipc/_broker/engine/*.[ch]) \
          pktipc/_build_ffi.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: deps $(STAMP)

demo: install
	$(PY) -m pktipc demo

test: install
	$(MAKE) -C clients/c test
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check pktipc tests bench
	$(VENV)/bin/mypy

fuzz: install
	$(MAKE) -C tests/c fuzz SECONDS=$(SECONDS) PY=$(abspath $(PY))

lint: install
	$(VENV)/bin/ruff check pktipc tests bench
	$(VENV)/bin/mypy

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

bench: install $(BENCH_STAMP)
	$(PY) -m bench.suite

bench-quick: install $(BENCH_STAMP)
	$(PY) -m bench.suite --quick

clean:
	rm -rf $(VENV) build *.egg-info pktipc/*.so
	$(MAKE) -C clients/c clean
	$(MAKE) -C tests/c clean
