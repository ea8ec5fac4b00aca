# The two commands of the README:
#   make demo   set up .venv, export the demo checkpoint, serve it with Triton, run, evaluate, visualise
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch 2.13.0 (CPU build) lies on these machines' local disk; pip takes it from there.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test test-fast bench bench-tools clean

setup: $(STAMP) browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=69" wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[server,semantic,test,ui]"
	# xgrammar without its GPU kernel dependency (triton, ~1 GB): we apply its masks on the CPU.
	$(PIP) install -q --no-deps "xgrammar>=0.2.8,<0.3" "apache-tvm-ffi>=0.1.11,<0.2"
	touch $(STAMP)

# The viewer's browser tests drive Debian's chromium + chromedriver (no tool that downloads its own
# browser). Installed when missing and we are root (CI); elsewhere say how.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: browser tests need chromium + chromium-driver (sudo apt-get install chromium chromium-driver)"; fi

demo: setup
	$(PY) -m coordexp.demo

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

bench: setup
	$(PY) bench/bench_serving.py

# External benchmark clients in their own virtualenv (their pins differ from ours): aiperf, NVIDIA's
# OpenAI-API benchmark client, for bench/bench_openai.py.
bench-tools:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q "aiperf>=0.13,<0.14"

clean:
	rm -rf $(VENV) .venv-bench runs build *.egg-info
