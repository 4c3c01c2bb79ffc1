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
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/sft.py --config recipes/configs/sft_tiny.yaml \
		--train_file $(DATA_DIR)/train.jsonl --eval_file $(DATA_DIR)/eval.jsonl --video_root $(DATA_DIR) \
		--output_dir $(DEMO_DIR)
	$(PY) -m videollm.eval --model $(DEMO_DIR) --data $(DATA_DIR)/test.jsonl --video_root $(DATA_DIR) \
		--output $(DEMO_DIR)/eval_test.json
	$(PY) -m videollm.eval --model $(DEMO_DIR) --data $(DATA_DIR)/test.jsonl --video_root $(DATA_DIR) \
		--output $(DEMO_DIR)/eval_test_shuffled.json --shuffle_frames

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) bench/bench_decode.py

clean:
	rm -rf outputs data/synthetic .pytest_cache
