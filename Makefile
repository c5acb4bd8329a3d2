# Quick start: `make demo` (install + caption sample images end to end) and `make test` (install + suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch that these machines carry; override (e.g. TORCH_SPEC=torch) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
# aiobotocore (s3fs) pins botocore; moto would otherwise pull a newer one.
BOTO_PINS ?= boto3==1.43.117 botocore==1.43.117
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" $(BOTO_PINS)
	touch $(STAMP)

demo: install
	$(PY) jobs/caption.py --demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) bench/generate.py --preset small --runs 5
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) demo_output .bench_cache
