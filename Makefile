# Set-up and the two entry points README opens with. Works on a fresh machine with only Python 3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup demo test bench clean

# torch is installed first and pinned: 2.13.0 resolves to a CPU build on this machine class, while an
# unpinned torch (or timm, through torchvision) would pull a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,dev]"
	touch $@

setup: $(BIN)/.installed

# The main job on the embedded reference model: prune half the blocks data-free, export a validated
# ONNX graph, profile dense vs pruned on this CPU, and measure fidelity and k-NN against the dense model;
# then the whole pipeline as one recipe (blocks + tokens + int8, profiled and evaluated against dense).
demo: setup
	rm -rf $(OUT)/demo && mkdir -p $(OUT)/demo
	$(BIN)/mimc inspect ref -o $(OUT)/demo/inspect.png
	$(BIN)/mimc prune ref --ratio 0.5 -o $(OUT)/demo/half
	$(BIN)/mimc export ref -o $(OUT)/demo/dense
	$(BIN)/mimc export $(OUT)/demo/half
	$(BIN)/mimc profile $(OUT)/demo/dense/model.onnx --device cpu
	$(BIN)/mimc profile $(OUT)/demo/half/model.onnx --device cpu
	$(BIN)/mimc eval $(OUT)/demo/half --ref ref --data builtin
	$(BIN)/mimc run examples/ref-cpu.yaml -o $(OUT)/demo/recipe

test: setup
	$(BIN)/python -m pytest tests -p no:cacheprovider

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(OUT)
