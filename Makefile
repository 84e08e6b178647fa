# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-data bench-quality ablation constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[pipeline,test,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slimmoe demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/importance.py
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/pipeline.py

bench-data: $(STAMP)  # slimmoe tokenize vs the tokenizer alone, peak RSS of reading token shards at 50M vs 100M tokens
	$(BIN)/python bench/data.py

bench-quality: $(STAMP)  # the ablation on the demo teacher, 3 seeds (~20+ min on 2 cores; needs `make demo` first)
	$(BIN)/python bench/quality.py

ablation: $(STAMP)  # strategies side by side on the demo teacher: outputs/demo/ablation/report.md
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slimmoe ablate deployments/configs/ablation-demo.yaml

constraints:  # re-resolve every dependency within pyproject.toml's ranges, pin them in constraints.txt, run the suite
	PY=$(PY) scripts/refresh-constraints

clean:
	rm -rf $(VENV) outputs runs
