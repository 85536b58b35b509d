# The two commands of the README. Both set up .venv on first use (see scripts/setup_env.sh).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) scripts/demo.py

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU, so CI checks the same kernel code.
# The pytest script, not `python -m pytest`: the latter puts the repo root on sys.path, where our
# nodes/ and kernels/ would shadow ComfyUI's `nodes` module and other packages' `kernels`.
# OCTET_SETUP_BROWSER=1: also install Chromium (as root) for the real-browser test in tests/server.
test:
	OCTET_SETUP_BROWSER=1 bash scripts/setup_env.sh
	TRITON_INTERPRET=1 .venv/bin/pytest tests -q
