# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-quantize bench bench-cache bench-data bench-quality bench-scale bench-slim ablation constraints clean

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

test-quantize: $(STAMP)  # llm-compressor in its own environment (scripts/install-llmcompressor, once), then the quantization tests
	test -x .venv-llmcompressor/bin/python || PY=$(PY) scripts/install-llmcompressor
	$(BIN)/python -m pytest -q tests/test_quantize.py tests/test_quantize_engine.py

bench: $(STAMP)
	$(BIN)/python bench/importance.py
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/pipeline.py

bench-scale: $(STAMP)  # FSDP2 vs DDP at 2 processes: state and peak memory per rank, step time (~3 min on 2 cores)
	$(BIN)/python bench/scale.py

bench-cache: $(STAMP)  # float16 vs float32 teacher cache vs live teacher, 2 seeds (a few minutes on 2 cores)
	$(BIN)/python bench/teacher_cache.py

bench-data: $(STAMP)  # slimmoe tokenize vs the tokenizer alone, peak RSS of reading token shards at 50M vs 100M tokens
	$(BIN)/python bench/data.py

bench-slim: $(STAMP)  # streamed vs in-memory slimming of a few-hundred-MB safetensors checkpoint: peak RSS
	$(BIN)/python bench/slim_stream.py

bench-quality: $(STAMP)  # the ablation on the demo teacher, 3 seeds (~20+ min on 2 cores; needs `make demo` first)
	$(BIN)/python bench/quality.py

ablation: $(STAMP)  # strategies side by side on the demo teacher: outputs/demo/ablation/report.md
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slimmoe ablate deployments/configs/ablation-demo.yaml

constraints:  # re-resolve every dependency within pyproject.toml's ranges, pin them in constraints.txt, run the suite
	PY=$(PY) scripts/refresh-constraints

clean:
	rm -rf $(VENV) outputs runs
