# loramux: every target does its own set-up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo lint proto bench fixtures-adapterhub clean constraints

install: $(VENV)/.installed

# constraints.txt: the versions of the last green run, so that a release upstream cannot turn CI red
# between two sessions (transformers 5.25 moved Falcon across the self-check; grpcio-tools 1.85.4 rewrote
# the stubs' version line). `make constraints` refreshes it from a fresh install of the newest versions.
CONSTRAINTS ?= -c constraints.txt
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(CONSTRAINTS) -e '.[test,ray]'
	touch $@

# the install above into a venv of its own, without constraints, then its versions (torch aside)
constraints:
	rm -rf .venv-constraints
	$(MAKE) install VENV=.venv-constraints CONSTRAINTS=
	{ echo "# make constraints: the versions make install uses (torch comes from TORCH_SPEC first)"; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

# The oracle tests (PEFT, AdapterHub, soft prompts, merged) once more with every forward forced onto each
# LoRA path: the per-segment reference, the grouped pure-torch path, the Triton kernels (interpreted on CPU).
ORACLE_TESTS := tests/test_peft_adapters.py tests/test_soft_prompts.py tests/test_merged.py tests/test_adapterhub.py

test: install
	$(PY) -m pytest -q
	for path in segment grouped triton; do \
		echo "== oracle tests, --lora-path $$path"; \
		$(PY) -m pytest -q -p no:warnings --lora-path $$path $(ORACLE_TESTS) || exit 1; \
	done

demo: install
	$(PY) scripts/demo.py

lint: install
	$(VENV)/bin/ruff check server tests scripts

# Regenerate the committed Python stubs from the proto (tests check they are current).
proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=server --grpc_python_out=server --pyi_out=server \
		proto/loramux/v1/loramux.proto

bench: install
	$(PY) -m loramux.cli bench --out bench-results

# AdapterHub's `adapters` pins transformers 4.57, so its fixtures come from a venv of their own.
ADAPTERHUB_VENV ?= .venv-adapterhub
fixtures-adapterhub:
	$(PYTHON) -m venv $(ADAPTERHUB_VENV)
	$(ADAPTERHUB_VENV)/bin/python -m pip install -q --upgrade pip
	$(ADAPTERHUB_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(ADAPTERHUB_VENV)/bin/python -m pip install -q adapters==1.3.0
	$(ADAPTERHUB_VENV)/bin/python scripts/make_adapterhub_fixtures.py --out tests/fixtures/adapterhub

clean:
	rm -rf $(VENV) build dist server/*.egg-info .pytest_cache .ruff_cache
