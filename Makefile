PY := .venv/bin/python
CONFIG ?= configs/digits/sigmoid_focal_R18_FPN_1x.yaml

.PHONY: env train test lint format clean

env:
	@bash scripts/bootstrap.sh

train: env
	$(PY) train_net.py --config-file $(CONFIG) $(ARGS)

test: env
	$(PY) -m pytest -q tests $(ARGS)

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: env
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf .venv output datasets
