# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser test lint demo bench bench-gpu clean

install: $(STAMP)

# torch first, with pip (2.13.0 resolves to the local CPU wheel, which uv does not look for; a looser pin
# pulls a multi-GB CUDA build), then natten without build isolation (its setup.py imports torch), then the
# rest fully pinned, with uv: the same packages as pip in a fraction of the time, keeping the torch already
# installed; compiled to bytecode as pip does (where PYTHONDONTWRITEBYTECODE is set, nothing else would, and
# every Ray worker would compile its imports again).
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3 uv==0.13.9
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation natten==0.21.7
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# the report's browser test drives Debian's Chromium: installed here when missing (as root, with apt)
browser:
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# three lanes of pytest processes at once: the Ray and S3 tests, those with Ray clusters of their own, and
# the pure-computation ones in two halves (tests/lanes.py)
test:
	$(MAKE) --jobs=2 --output-sync=target install browser  # Chromium fetched while the venv fills
	$(PY) -m ruff check .
	$(PY) tests/lanes.py

demo: install
	$(VENV)/bin/dinat-batch demo

bench: install
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/model.py
	$(PY) benchmarks/pipeline.py

# on a machine with a GPU: kernels, models, decode and the pipeline in one report (under 10 minutes)
bench-gpu: install
	$(PY) benchmarks/gpu.py --record

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
