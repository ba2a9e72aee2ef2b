# The whole setup on a fresh machine: `make demo` and `make test` (each installs what is missing first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO := runs/demo

.PHONY: install demo test bench clean

install:
	$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) -m mimkit.cli pretrain --config configs/demo.yaml --output $(DEMO) --overwrite
	$(PYTHON) -m mimkit.cli reconstruct --checkpoint $(DEMO) --images builtin --val-fraction 0.1 --output $(DEMO)/figures
	$(PYTHON) -m mimkit.cli knn --checkpoint $(DEMO) --data builtin --output $(DEMO)/knn
	$(PYTHON) -m mimkit.cli knn --checkpoint $(DEMO) --data builtin --random-init --output $(DEMO)/knn-random-init

test: install
	$(PYTHON) -m pytest tests -q

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) -m mimkit.cli bench --out runs/bench.json

clean:
	rm -rf runs .pytest_cache
