# migstall — see README.md.  `make demo` and `make test` install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.migstall-installed
PYTEST_ARGS ?=

.PHONY: setup demo demo-series test test-slow test-host lint kernels bench soak clean help

help:
	@echo "make demo       run the default scenario here and print the results"
	@echo "make demo-series build the fast-write-protect series, measure it against stock in the virtual host"
	@echo "make test       run the test suite (installs what it needs first)"
	@echo "make test-slow  the long end-to-end tests (nightly against the virtual host)"
	@echo "make test-host  the host scenario matrix with KVM (needs an Intel VMX/AMD SVM host)"
	@echo "make lint       static checks: ruff on harness/ and tests/, mypy on harness/ (config in pyproject.toml), shellcheck on the shell files"
	@echo "make kernels    build stock and patched kernels of the seed test series"
	@echo "make bench      benchmarks: print timings (not tests)"
	@echo "make soak       SOAK_ARGS='--runs 50 -- --mem 512M --vcpus 2': loop runs, print the pass rate"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-host
	./scripts/setup-host
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,build,lint]'
	touch $@

demo: setup
	$(BIN)/migstall demo

demo-series: setup
	$(BIN)/migstall demo-series

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Every shell file of the repo (busybox ash runs guests/init and L1's harness/sh/l1_*.sh: POSIX sh is checked)
SHELL_FILES := scripts/setup-host .ci/run guests/init $(wildcard harness/sh/*.sh)

lint: setup
	$(BIN)/ruff check harness tests
	$(BIN)/mypy harness
	@command -v shellcheck >/dev/null || { echo "make lint: shellcheck not found; install it (Debian/Ubuntu: apt-get install shellcheck, which scripts/setup-host does when the release has it)" >&2; exit 2; }
	shellcheck $(SHELL_FILES)

test-host: setup
	$(BIN)/migstall run --scenario scenarios/host.toml --accel kvm --out results/host.csv

kernels: setup
	$(BIN)/migstall kernel build --manifest patches/migstall-dirtylog-tracepoints/series.toml --variant both

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

SOAK_ARGS ?= --runs 10 -- --dirty-log-mode legacy --mem 512M --vcpus 2 --accel kvm
soak: setup
	$(BIN)/python scripts/soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
