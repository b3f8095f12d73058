# `make demo` and `make test` are the whole set-up on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Pretrain Barlow Twins (ResNet-18) on the built-in synthetic dataset on CPU, then compare the
# pretrained and a random-init backbone with kNN and a linear probe.
demo: $(STAMP)
	$(PY) barlow/train.py --config barlow/configs/demo.yaml

# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
test: $(STAMP)
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

clean:
	rm -rf runs .pytest_cache
