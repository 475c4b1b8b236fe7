# The two commands a fresh machine needs (see README):
#   make demo   — set up, then run the main job (text-to-image on the embedded default model)
#   make test   — set up, then run the test suite (what CI runs)
# and, after changing a notebook or what it shows:
#   make notebooks — re-execute every notebook in place and store its outputs (NB="06 10d" for some of them)
PY ?= python3
PROMPT ?= a blue triangle

.PHONY: setup demo test test-slow bench notebooks
setup:
	@# CPU build of torch from this machine's disk; a bare `torch` requirement would pull a multi-GB CUDA build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@# Debian's Chromium for the annotate page's browser test (Playwright drives it; it never downloads a browser)
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the browser test will be skipped"; \
	fi

demo: setup
	$(PY) -m minidiff generate "$(PROMPT)" --seed 0 --out demo.png

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/bench_unet_cpu.py

notebooks: setup
	$(PY) notebooks/execute.py $(NB)
