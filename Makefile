# The whole setup on a fresh machine: `make demo` and `make test` (each installs what is missing first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO := runs/demo

.PHONY: install browser demo test bench clean

install:
	$(PIP) install -q -e ".[dev]"

# the browser test (tests/test_explore_browser.py) drives Debian's Chromium through Playwright (the demo needs neither)
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "make browser: no chromium for the browser test; install it: sudo apt-get install -y chromium"; fi

# The demo's score is the held-out reconstruction error against the flat-patch reference, with its standard error
# over the 100 held-out images. No k-NN here: on 100 images its standard error is ~4.5 points, more than two minutes
# of pretraining move it (the CIFAR-10 results in the README measure it on 5,000).
demo: install
	$(PYTHON) -m mimkit.cli pretrain --config configs/demo.yaml --output $(DEMO) --overwrite
	$(PYTHON) -m mimkit.cli reconstruct --checkpoint $(DEMO) --data builtin --val-fraction 0.1 --output $(DEMO)/figures

# two test processes (pytest-xdist): most tests run one thread, so the 2-core machine runs two at once
test: install browser
	$(PYTHON) -m pytest tests -q -n 2

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) -m mimkit.cli bench --output runs/bench.json

clean:
	rm -rf runs .pytest_cache
