# The two quick-start commands: `make demo` and `make test`. Both set up .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch + torchvision that import together on a CPU-only machine (timm needs torchvision).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=25
# Every pip install runs with --no-compile: Python byte-compiles the modules actually imported, on first
# import, instead of every file of torch, jax and transformers at install time (a minute of CPU less).

.PHONY: setup demo test setup-latest test-latest setup-device-jax test-device-jax compile-h100 compile-tpu model-table clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH_PIN)
	$(PY) -m pip install -q --no-compile -e ".[torch,data,dev]"
	$(PY) -m pip install -q --no-compile --no-deps "arch>=8.0"  # its S&P 500 file only (pyproject: series)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m train.main --config train/configs/quickstart.py --workdir workdir/quickstart

# pytest exits 5 when it collected nothing: that is a failure here, never a silent success.
RUN_PYTEST = rc=0; $(1) -m pytest $(PYTEST_ARGS) $(2) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

test: setup
	@$(call RUN_PYTEST,$(PY),)

# Second CI leg: newest jax/flax on Python 3.12, no torch: what is most exposed to version drift (the
# Pallas kernels against their references, sharding, the registry and the Hugging Face door) and a
# trace of every model family (tests/test_zoo.py), which traces every layer on the new jax; the
# numbers of layers and models (and the kernels' random-configuration campaign) are the main leg's,
# the Hopper kernels' interpret runs the third leg's.
PY312 ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c "import sys; print(sys.executable)" 2>/dev/null || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
VENV312 ?= .venv312
LATEST_TESTS ?= tests/kernels --ignore=tests/kernels/test_random_configs.py tests/test_registry.py \
	tests/test_sharding.py tests/test_hf.py tests/test_imports.py tests/test_zoo.py
$(VENV312)/.installed: pyproject.toml
	@test -n "$(PY312)" || (echo "python3.12 not found" && exit 1)
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --no-compile --upgrade pip
	$(VENV312)/bin/python -m pip install -q --no-compile --upgrade -e ".[dev]" jax flax optax orbax-checkpoint chex scikit-learn
	touch $@
setup-latest: $(VENV312)/.installed
test-latest: setup-latest
	$(VENV312)/bin/python -c "import jax, flax; print('latest leg: jax', jax.__version__, 'flax', flax.__version__)"
	@$(call RUN_PYTEST,$(VENV312)/bin/python,-m "not slow and not mosaic_gpu_interpret" $(LATEST_TESTS))

# Third CI leg: the jax of the lent GPU machine (its image pins it; .library/device/KINDS.md), where
# the Mosaic GPU kernels first compile for real. Its interpret mode checks more than the newest jax's
# in places (every barrier phase observed before deallocation), so the Hopper kernels' interpret runs
# (marker mosaic_gpu_interpret) happen here, with the deviceless lowering checks and the benchmark smoke.
DEVICE_JAX ?= 0.11.2
VENV_DEVICE_JAX ?= .venv-device-jax
$(VENV_DEVICE_JAX)/.installed: pyproject.toml
	@test -n "$(PY312)" || (echo "python3.12 not found" && exit 1)
	$(PY312) -m venv $(VENV_DEVICE_JAX)
	$(VENV_DEVICE_JAX)/bin/python -m pip install -q --no-compile --upgrade pip
	$(VENV_DEVICE_JAX)/bin/python -m pip install -q --no-compile --upgrade -e ".[dev]" jax==$(DEVICE_JAX) jaxlib==$(DEVICE_JAX) flax optax orbax-checkpoint chex
	touch $@
setup-device-jax: $(VENV_DEVICE_JAX)/.installed
test-device-jax: setup-device-jax
	$(VENV_DEVICE_JAX)/bin/python -c "import jax, flax; print('device-jax leg: jax', jax.__version__, 'flax', flax.__version__)"
	@$(call RUN_PYTEST,$(VENV_DEVICE_JAX)/bin/python,-m "mosaic_gpu_interpret and not slow" tests/kernels tests/models)
	@$(call RUN_PYTEST,$(VENV_DEVICE_JAX)/bin/python,-m "not slow" tests/kernels/test_gpu_kernel.py \
	  tests/kernels/test_benchmark_kernels.py \
	  tests/kernels/test_bi_level_routing.py::test_kernels_lower_for_gpu_and_tpu_without_hardware \
	  tests/kernels/test_local_global.py::test_kernels_lower_for_gpu_triton \
	  tests/kernels/test_local_global.py::test_tpu_splash_path_lowers_for_tpu)

# Not in CI (big installs): compile every kernel and BiFormer-T's train step for an H100 (~5 GB of
# CUDA wheels) or a TPU v5e (libtpu, ~1.5 GB) on this host, no accelerator needed
# (benchmarks/compile_check.py); run them before spending device time.
VENV_H100 ?= .venv-compile-h100
VENV_TPU ?= .venv-compile-tpu
TPU_TARGET ?= v5e
compile-h100:
	@test -n "$(PY312)" || (echo "python3.12 not found" && exit 1)
	test -x $(VENV_H100)/bin/python || $(PY312) -m venv $(VENV_H100)
	$(VENV_H100)/bin/python -m pip install -q --no-compile --upgrade pip
	$(VENV_H100)/bin/python -m pip install -q --no-compile -e . "jax[cuda13]==$(DEVICE_JAX)" jaxlib==$(DEVICE_JAX)
	$(VENV_H100)/bin/python benchmarks/compile_check.py --target h100
compile-tpu:
	@test -n "$(PY312)" || (echo "python3.12 not found" && exit 1)
	test -x $(VENV_TPU)/bin/python || $(PY312) -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install -q --no-compile --upgrade pip
	$(VENV_TPU)/bin/python -m pip install -q --no-compile -e . "jax[tpu]==$(DEVICE_JAX)" jaxlib==$(DEVICE_JAX)
	$(VENV_TPU)/bin/python benchmarks/compile_check.py --target $(TPU_TARGET)

model-table: setup
	$(PY) scripts/model_table.py --write README.md

clean:
	rm -rf $(VENV) $(VENV312) $(VENV_DEVICE_JAX) $(VENV_H100) $(VENV_TPU) workdir
