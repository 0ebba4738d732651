# Quick start: `make run` starts the demo server, `make test` runs the whole suite (after
# installing, as root on Debian, the packages whose programs the tests run: .ci/debian-deps).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STATE  ?= state
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench fuzz fuzz-coverage fuzz-corpus clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fuzz]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/msgctl demo init $(STATE)
	$(BIN)/msgd --config $(STATE)/msgd.toml

test: $(STAMP)
	bash .ci/debian-deps
	$(BIN)/ruff check wire msgd tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check wire msgd tests bench

bench: $(STAMP)
	$(BIN)/python -m bench

fuzz: $(STAMP)
	$(BIN)/python -m wire.fuzz --seconds 600

# Line coverage of wire/ and of the connection adapter reached by the seeds, the kept corpus
# (fuzz/corpus) and what campaigns left in fuzz-out/corpus; FUZZ_SECONDS=N fuzzes each target
# N seconds first.
FUZZ_SECONDS ?= 0
fuzz-coverage: $(STAMP)
	$(BIN)/python -m msgd.server.fuzz --coverage --seconds $(FUZZ_SECONDS)

# Fold what campaigns found (fuzz-out/corpus) into the kept corpus, minimised.
fuzz-corpus: $(STAMP)
	$(BIN)/python -m msgd.server.fuzz --minimise

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache .hypothesis
