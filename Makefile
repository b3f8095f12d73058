# `make demo` and `make test` are the whole set-up on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test transfer-env transfer-test transfer-demo clean clean-venv

# The versions the suite and the demo were measured with (constraints.txt; torch left open). Another set:
# `make test CONSTRAINTS=other.txt`, or `CONSTRAINTS=` for the open ranges of pyproject.toml alone
# (after `make clean-venv`, since an existing venv is kept as it is).
CONSTRAINTS ?= constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(if $(strip $(CONSTRAINTS)),-c $(CONSTRAINTS)) -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Pretrain Barlow Twins (ResNet-18) on the built-in synthetic dataset on CPU, then compare the
# pretrained and a random-init backbone with kNN and a linear probe.
demo: $(STAMP)
	$(PY) barlow/train.py --config barlow/configs/demo.yaml

# Two parts, both always run: every test except the learning ones in two pytest-xdist workers side
# by side (one thread each: most of these tests start processes and import torch, and run in one
# process they left a core idle), then the learning tests (short pretrainings, whose margins were
# measured with two threads) alone. pytest exits 5 when it collects nothing: a failure here, never a pass.
LEARNING_TESTS := tests/test_learning.py $(wildcard tests/test_learning_*.py)
test: $(STAMP)
	@fail=0; \
	for part in "-n 2 --dist loadgroup $(addprefix --ignore ,$(LEARNING_TESTS)) tests" "$(LEARNING_TESTS)"; do \
		$(PY) -m pytest -q $$part; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests in: $$part" >&2; fi; \
		if [ $$rc -ne 0 ] && [ $$fail -eq 0 ]; then fail=$$rc; fi; \
	done; exit $$fail

# A separate environment for transfer to detection and segmentation (shared/transfer/README.md):
# torch 2.8, the last torch that mmcv (the maintained onedl fork) compiles against, with mmengine,
# mmsegmentation and detectron2 built from source, and this package. onedl-mmcv compiles its CPU ops
# (about 8 minutes on 2 cores). DETECTRON2_SRC: a detectron2 source folder or pip URL; empty leaves
# detectron2 out (CI, which cannot reach GitHub: the detectron2 tests then skip).
TVENV  ?= .venv-transfer
TPY    := $(TVENV)/bin/python
TSTAMP := $(TVENV)/.installed
DETECTRON2_COMMIT := 02b5c4e295e990042a714712c21dc79b731e8833
DETECTRON2_SRC ?= git+https://github.com/facebookresearch/detectron2.git@$(DETECTRON2_COMMIT)
TPIP   := $(TPY) -m pip install --quiet --disable-pip-version-check

$(TSTAMP): pyproject.toml
	@test -x $(TPY) || $(PYTHON) -m venv $(TVENV)
	$(TPIP) "torch==2.8.*" "torchvision==0.23.*" "setuptools>=77,<81" wheel ninja
	$(TPIP) --no-build-isolation "onedl-mmcv==2.3.6" "onedl-mmengine==0.10.12" "onedl-mmsegmentation==1.4.2"
	$(TPIP) yacs "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" hydra-core pycocotools tabulate termcolor \
		cloudpickle omegaconf
	$(if $(strip $(DETECTRON2_SRC)),$(TPIP) --no-build-isolation --no-deps "$(DETECTRON2_SRC)",@echo "transfer-env: DETECTRON2_SRC is empty: detectron2 left out")
	$(TPIP) -e '.[test]'
	@echo "$(strip $(DETECTRON2_SRC))" > $(TSTAMP)

transfer-env: $(TSTAMP)

# The transfer tests in the transfer environment. There mmseg must import (a failed import fails
# the tests instead of skipping them); detectron2 too, unless the environment was built without it.
TRANSFER_TESTS := tests/test_transfer.py $(wildcard tests/test_transfer_*.py)
transfer-test: $(TSTAMP)
	@d2="$$(cat $(TSTAMP))"; set -x; \
	REQUIRE_TRANSFER_STACK=mmseg,mmcv,mmengine$${d2:+,detectron2} $(TPY) -m pytest -q $(TRANSFER_TESTS)

# End to end on the built-in dataset, on CPU: export it as COCO and VOC, pretrain a ResNet-18 (Barlow
# Twins demo), convert it, fine-tune a detectron2 detector and an mmseg FCN from it and from random
# init, print AP and mIoU (shared/transfer/demo.py).
transfer-demo: $(TSTAMP)
	$(TPY) -m shared.transfer.demo --out runs/transfer-demo

clean:
	rm -rf runs .pytest_cache

clean-venv:
	rm -rf $(VENV)
