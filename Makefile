# Set-up and the main jobs. `make train` trains the default config and evaluates it;
# `make test` runs the test suite. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := runs/fashion_mnist
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: train test lint fashion-mnist clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: these wheels lie on the project's machines' disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian where apt-get exists (as root); elsewhere training falls back
# to torchvision's download (data.download=true)
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

train: $(VENV)/.installed fashion-mnist
	@if [ -d $(FASHION_MNIST) ]; then data=""; else data="data.root=data/fashion-mnist data.download=true"; fi; \
	$(PY) train.py --config configs/fashion_mnist.yaml --auto-resume $$data && \
	$(PY) eval.py --checkpoint $(RUN)/checkpoints/best --split test && \
	$(PY) -m vit.cli rollout $(RUN)/checkpoints/best --from-split --split test \
		--limit 8 --out $(RUN)/rollout $$( [ -n "$$data" ] && echo --root data/fashion-mnist )

test: $(VENV)/.installed fashion-mnist
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
