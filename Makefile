# sepme-course: `make test` (tests + notebooks in the ci profile) and `make course` (every notebook, in order).
# Both create/reuse .venv in the repository root by themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and explicitly (override on other machines, e.g. TORCH_PKGS="torch torchvision"
# or a CUDA-specific index); the rest comes from pyproject.toml's version ranges.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
PROFILE ?= full

.PHONY: test course lab bench clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev,lpips]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests/
	PROFILE=ci $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env notebooks/

course: $(VENV)/.installed
	PROFILE=$(PROFILE) $(PY) -m sepme_lib.course

lab: $(VENV)/.installed
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

bench: $(VENV)/.installed
	$(PY) -m sepme_lib.bench quality --json
	$(PY) -m sepme_lib.bench sepme --profile ci

clean-venv:
	rm -rf $(VENV)
