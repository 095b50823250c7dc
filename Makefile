# castore: `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).
# Each target installs what it needs: Debian packages (apt-get), the virtualenv, the project.

# Debian's own interpreter where it is new enough (Debian 12: 3.11, built with PGO and LTO): every
# castore command starts 15-20 ms sooner on it than on a self-built 3.11 (pyenv's, measured here).
DEBIAN_PYTHON := $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3)
PYTHON ?= $(or $(DEBIAN_PYTHON),python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages

# What castore runs: squashfs-tools-ng (gensquashfs), e2fsprogs, bubblewrap, the kernel toolchain,
# and what the tests read images back with (unsquashfs, debugfs, b3sum) or boot them in (QEMU).
APT_PACKAGES := squashfs-tools-ng squashfs-tools e2fsprogs bubblewrap make gcc libc6-dev flex bison \
	bc libelf-dev libssl-dev perl xz-utils zstd tar qemu-system-x86 b3sum faketime util-linux ca-certificates \
	nginx iproute2
BENCH_PACKAGES := nix-bin ostree debootstrap casync hyperfine strace curl wrk

.PHONY: demo test check lint bench deps system clean

# Bytecode written now, as pip does for a regular install: an editable install otherwise compiles
# castore on every start where PYTHONDONTWRITEBYTECODE is set (20-30 ms per command).
deps: $(STAMP)
	@$(BIN)/python -m compileall -q castore

system: $(SYSTEM_STAMP)

$(SYSTEM_STAMP):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# debian_package recipes fetch through apt: it needs package lists
	@ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "castore needs Python 3.11 or newer"; exit 1; }
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml $(SYSTEM_STAMP)
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: deps
	@echo "== castore realize recipes/app.py (kernel, rootfs, image; the kernel takes a few minutes the first time)"
	$(BIN)/castore realize recipes/app.py -o result
	@echo "== again: everything is in the store, nothing is built"
	$(BIN)/castore realize recipes/app.py
	@echo "== castore verify"
	$(BIN)/castore verify --no-contents

test: deps
	$(BIN)/pytest -q -ra

lint: deps
	$(BIN)/ruff check castore tests recipes bench
	$(BIN)/mypy

check: lint test

bench: deps
	@missing=$$(for p in $(BENCH_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache result
