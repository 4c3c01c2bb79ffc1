# One command for the demo, one for the tests. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= outputs/demo
DATA_DIR ?= data/synthetic

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: on these machines that is the local CPU wheel; anything looser pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,serve,deepspeed]"
	$(PY) -m pip install --quiet "torchcodec==0.13.0" || echo "torchcodec not installed: decord/PyAV will decode"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) data_tools/make_synthetic.py --output_dir $(DATA_DIR) --seed 0
	# the tiny config keeps its vision tower frozen: encode every clip once, then train from the cached features
	rm -rf $(DEMO_DIR)/feature_cache
	$(PY) data_tools/cache_features.py --config recipes/configs/sft_tiny.yaml \
		--train_file $(DATA_DIR)/train.jsonl --eval_file $(DATA_DIR)/eval.jsonl --video_root $(DATA_DIR) \
		--feature_cache_dir $(DEMO_DIR)/feature_cache
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/sft.py --config recipes/configs/sft_tiny.yaml \
		--train_file $(DATA_DIR)/train.jsonl --eval_file $(DATA_DIR)/eval.jsonl --video_root $(DATA_DIR) \
		--feature_cache_dir $(DEMO_DIR)/feature_cache --output_dir $(DEMO_DIR)
	$(PY) -m videollm.eval --model $(DEMO_DIR) --data $(DATA_DIR)/test.jsonl --video_root $(DATA_DIR) \
		--output $(DEMO_DIR)/eval_test.json
	$(PY) -m videollm.eval --model $(DEMO_DIR) --data $(DATA_DIR)/test.jsonl --video_root $(DATA_DIR) \
		--output $(DEMO_DIR)/eval_test_shuffled.json --shuffle_frames

# Two workers, a test file each at a time (a file's module fixtures are built once), one thread per process: on the
# 2-core CI machine the suite took 11.5 minutes so (2026-12-03), against 14.5 to 19 minutes in one process: many
# tests spend their time starting subprocesses on one core. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

# Every benchmark; tables on stdout, JSON in bench/results/. On a GPU: make bench BENCH_SFT_ARGS="--preset qwen2.5-0.5b"
BENCH_SFT_ARGS ?=
bench: install
	mkdir -p bench/results
	$(PY) bench/bench_sft.py $(BENCH_SFT_ARGS) --json bench/results/sft.json
	$(PY) bench/bench_dpo.py --json bench/results/dpo.json
	$(PY) bench/bench_sampling.py --threads 1 --json bench/results/sampling.json
	$(PY) bench/bench_decode.py --json bench/results/decode.json

clean:
	rm -rf outputs data/synthetic .pytest_cache
