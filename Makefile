PY := .venv/bin/python
CONFIG ?= configs/digits/sigmoid_focal_R18_FPN_1x.yaml

.PHONY: env train test clean

env:
	@bash scripts/bootstrap.sh

train: env
	$(PY) train_net.py --config-file $(CONFIG) $(ARGS)

test: env
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf .venv output datasets
