# sepme-course. The two commands: `make test` (unit tests, the notebooks' committed state, nbval of every notebook
# in the ci profile, every notebook on a random-weight Stable Diffusion folder, the widget in a real browser) and
# `make course` (every notebook in order into build/). Every target creates/reuses .venv in the repository root.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and explicitly (override on other machines, e.g. TORCH_PKGS="torch torchvision"
# or a CUDA-specific index); the rest comes from pyproject.toml's version ranges.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
# `make lab` opens the ci profile unless PROFILE is given (PROFILE=full make lab); `make course` runs full by default.
LAB_PROFILE := $(if $(filter environment command line,$(origin PROFILE)),$(PROFILE),ci)
PROFILE ?= full
LAB_ARGS ?=
NB ?=
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
SAMPLE_CACHE ?= build/sample-cache

.PHONY: browser-deps test test-unit test-notebooks nbval-a nbval-b test-sd test-browser check-notebooks notebooks course lab bench venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev,lpips]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	touch $@

# JupyterLab (and selenium for the browser test) are installed once, from pyproject's extras, when first needed.
$(VENV)/.lab: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,lpips,lab]"
	touch $@

$(VENV)/.browser: $(VENV)/.lab
	$(PY) -m pip install -q -e ".[dev,lpips,browser]"
	touch $@

# the browser's prerequisites first (so that a missing one is reported before the long targets, never after), then the
# unit tests, nbval and the random-SD notebooks side by side (one torch thread each; each target's output printed whole
# when it ends), then the browser test
test: browser-deps $(VENV)/.browser
	SEPME_THREADS=1 OMP_NUM_THREADS=1 $(MAKE) -j3 --output-sync=target test-unit test-notebooks test-sd
	SEPME_THREADS=1 OMP_NUM_THREADS=1 SEPME_SAMPLE_CACHE=$(abspath $(SAMPLE_CACHE)) $(MAKE) test-browser

test-unit: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests/

# nbval re-executes every notebook and compares the marked cells with the committed outputs (one torch thread, as
# `make notebooks` executes them)
# nbval in two processes (one torch thread each, notebooks of similar total time; 07 after 03, whose table it shows
# again). `model.sample` keeps each call's images in $(SAMPLE_CACHE) (emptied first), so a table that notebooks draw
# again (the original model's, the bundled increments' combinations) is sampled once per run (config.sample_cache_dir:
# a call is reused only when the weights, prompts, seeds and settings are identical; the browser test reuses 05's)
NBVAL_A ?= 00 01 03 07 04
NBVAL_B ?= 02 05 06 08 09
NBVAL = PROFILE=ci MODEL=tiny SEPME_THREADS=1 OMP_NUM_THREADS=1 SEPME_SAMPLE_CACHE=$(abspath $(SAMPLE_CACHE)) \
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env
test-notebooks: $(VENV)/.installed
	$(PY) -m sepme_lib.course check
	rm -rf $(SAMPLE_CACHE)
	$(MAKE) -j2 --output-sync=target nbval-a nbval-b

nbval-a: $(VENV)/.installed
	$(NBVAL) $(foreach n,$(NBVAL_A),$(wildcard notebooks/$(n)_*.ipynb))

nbval-b: $(VENV)/.installed
	$(NBVAL) $(foreach n,$(NBVAL_B),$(wildcard notebooks/$(n)_*.ipynb))

# every notebook on a random-weight SD 1.x folder and on a random-weight SDXL folder (each built in a temporary
# directory), ci profile, CPU
test-sd: $(VENV)/.installed
	$(PY) -m sepme_lib.course test-sd
	$(PY) -m sepme_lib.course test-sd --kind sdxl

# JupyterLab headless + Debian's chromium: run notebook 05, toggle a checkbox, move a slider (tests/browser_lab.py)
test-browser: $(VENV)/.browser
	@test -x $(CHROMIUM) -a -x $(CHROMEDRIVER) || { echo "needs $(CHROMIUM) and $(CHROMEDRIVER): sudo apt-get install -y chromium chromium-driver"; exit 1; }
	CHROMIUM=$(CHROMIUM) CHROMEDRIVER=$(CHROMEDRIVER) $(PY) -m pytest -q -p no:cacheprovider -s tests/browser_lab.py

# Debian's chromium and chromium-driver for the browser test: installed when missing (as root or with passwordless
# sudo; nothing downloads a browser of its own), else a clear stop before anything long runs
browser-deps:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "make test needs $(CHROMIUM) and $(CHROMEDRIVER) for the browser test; install them first:"; \
	  echo "  sudo apt-get install -y chromium chromium-driver   (or give CHROMIUM=... CHROMEDRIVER=...)"; exit 2; fi; \
	command -v apt-get >/dev/null || { echo "no $(CHROMIUM)/$(CHROMEDRIVER) and no apt-get: install chromium and its driver, then give CHROMIUM=... CHROMEDRIVER=..."; exit 2; }; \
	echo "installing Debian's chromium and chromium-driver for the browser test (about a minute)"; \
	$$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	test -x $(CHROMIUM) -a -x $(CHROMEDRIVER) || { echo "chromium was installed but $(CHROMIUM) or $(CHROMEDRIVER) is missing; give CHROMIUM=... CHROMEDRIVER=..."; exit 2; }

check-notebooks: $(VENV)/.installed
	$(PY) -m sepme_lib.course check

# re-execute the notebooks in place (ci profile, CPU) and record version + code hash: what is committed.
# One notebook or a few: make notebooks NB="05 06"
notebooks: $(VENV)/.installed
	$(PY) -m sepme_lib.course execute $(NB)

course: $(VENV)/.installed
	PROFILE=$(PROFILE) $(PY) -m sepme_lib.course

lab: $(VENV)/.lab
	PROFILE=$(LAB_PROFILE) $(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

bench: $(VENV)/.installed
	$(PY) -m sepme_lib.bench quality --json
	$(PY) -m sepme_lib.bench sepme --profile ci

clean-venv:
	rm -rf $(VENV)
