# make demo: the main job on a built-in default.  make test: install and test
# (the C client's tests under the sanitizers and valgrind, then pytest, ruff, mypy;
# pytest builds and runs tests/c, the broker's C under the sanitizers and a few
# seconds of each fuzz target).  make fuzz SECONDS=N: each fuzz target for N
# seconds (tests/c/Makefile).
# All install what is missing (Debian packages, a virtual environment with
# pktipc built and installed editable) and are safe to run again; make test
# also installs Suricata and builds its capture plugin (clients/suricata/).

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.pktipc-installed
BENCH_STAMP := $(VENV)/.pktipc-bench-installed
DEBS    := gcc g++ make pkg-config python3-venv python3-dev iproute2 libpcap-dev libzmq3-dev \
           libmsgpack-dev tcpdump tshark valgrind prometheus tmux systemd util-linux \
           clang libclang-rt-14-dev llvm-14 llvm libxdp-dev libbpf-dev
SECONDS ?= 60

# make install-service: pktipc in its own virtual environment (PREFIX), the
# systemd units (pktipc@.service, pktipc-exporter.service), /etc/pktipc and
# the `pktipc` system user. DESTDIR stages it all (and creates no user).
PREFIX  ?= /opt/pktipc
UNITDIR ?= /usr/local/lib/systemd/system

.PHONY: all deps install install-service suricata demo test fuzz lint bench bench-quick clean

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
          $(wildcard pktipc/_client/engine/*.[ch]) pktipc/_build_ffi.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: deps $(STAMP)

# Suricata 7 from bookworm-backports, its source configured, and the plugin.
suricata: deps
	$(MAKE) -C clients/suricata deps all

install-service: deps
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q .
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)/etc/pktipc
	for u in pktipc@.service pktipc-exporter.service; do \
	    sed 's|@BINDIR@|$(PREFIX)/bin|' systemd/$$u.in > $(DESTDIR)$(UNITDIR)/$$u; done
	test -e $(DESTDIR)/etc/pktipc/example.toml || \
	    install -m 0644 systemd/example.toml $(DESTDIR)/etc/pktipc/example.toml
	if [ -z "$(DESTDIR)" ]; then \
	    id -u pktipc >/dev/null 2>&1 || useradd --system --no-create-home \
	        --home-dir /nonexistent --shell /usr/sbin/nologin pktipc; \
	    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; fi

demo: install
	$(PY) -m pktipc demo

test: install suricata
	$(MAKE) -C clients/c test
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check pktipc tests bench examples
	$(VENV)/bin/mypy

fuzz: install
	$(MAKE) -C tests/c fuzz SECONDS=$(SECONDS) PY=$(abspath $(PY))

lint: install
	$(VENV)/bin/ruff check pktipc tests bench examples
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
	$(MAKE) -C clients/suricata clean
	$(MAKE) -C tests/c clean
