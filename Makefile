# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-engines test-quantize bench bench-cache bench-data bench-quality bench-scale bench-serve bench-slim ablation constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[pipeline,test,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slimmoe demo

test: $(STAMP)  # everything but the opt-in `slow` checks (under 15 min on 2 cores)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)  # the opt-in `slow` checks: two-node work-pool run, MLflow UI in Chromium, every crash point, ... (~12 min)
	$(BIN)/python -m pytest -q -m slow tests

test-engines: $(STAMP)  # llama.cpp runs an exported GGUF as transformers runs the model (compiles llama.cpp: minutes)
	scripts/install-llama-cpp
	$(BIN)/python -m pytest -q -s tests/test_engines_llama_cpp.py

test-quantize: $(STAMP)  # llm-compressor in its own environment (scripts/install-llmcompressor, once), then the quantization tests
	test -x .venv-llmcompressor/bin/python || PY=$(PY) scripts/install-llmcompressor
	$(BIN)/python -m pytest -q tests/test_quantize.py tests/test_quantize_engine.py tests/test_quantize_stage.py

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

bench-serve: $(STAMP)  # llama.cpp (f32/f16/q8_0 GGUF) vs transformers generate: tokens/s and file sizes (needs make test-engines' install)
	scripts/install-llama-cpp
	$(BIN)/python bench/serve.py

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
