# Two commands on a fresh machine:   make train   |   make test
# Both create .venv (seeing a torch you already have, CUDA builds included), install the exact
# versions of requirements.lock, build the C++ extension against that torch, then do their job.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qwenrl-deps
ARGS   ?=
# Exact versions of every dependency (make lock writes it; tools/deps.py says how torch is kept).
LOCK   := requirements.lock
CONSTRAINTS := $(VENV)/constraints.txt
# The torch version `make lock` and `make check-install` install (a CPU build where pip sees one).
TORCH_LOCK ?= 2.13.0
# A missing C++ extension is an error in tests and benchmarks, not a row of skipped tests
# (temp files and compiler caches stay inside the checkout: conftest.py).
TEST_ENV := QWENRL_REQUIRE_EXT=1
# BUILD_WARNINGS=error (CI, make test-latest) fails the build on any warning of its own, such as
# setuptools announcing a deprecation. Not errors: setuptools' note that an install is editable
# (information), and pip's own unclosed-file ResourceWarnings (pip, not the build).
BUILD_WARNINGS ?= default
BUILD_ENV = PYTHONWARNINGS="$(BUILD_WARNINGS),ignore::ResourceWarning,ignore:Editable installation"

MUTMUT_PIN ?= mutmut==3.8.1

.PHONY: setup ext train test bench bench-full gpu-check gpu-compile lint format mutate clean check-install lock test-latest test-floors

# A venv that sees the system's packages only where the system has a torch to keep; otherwise
# a bare one, holding exactly the lock.
$(PY):
	$(PYTHON) -m venv $$($(PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages) $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(LOCK) tools/deps.py
	$(PY) tools/deps.py constraints $(LOCK) > $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) pip
	@# Keep a torch that is already importable (e.g. a CUDA build); otherwise take the lock's.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) torch
	@# The build imports torch, which warns without numpy.
	$(PY) -m pip install -q -c $(CONSTRAINTS) setuptools wheel ninja numpy
	$(BUILD_ENV) $(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,plot]" --no-build-isolation
	touch $@

setup: $(STAMP) ext

# Incremental (ninja) rebuild of qwenrl._C after a change in csrc/.
ext: $(STAMP)
	$(BUILD_ENV) $(PY) setup.py -q build_ext --inplace

train: setup
	$(PY) -m qwenrl.train $(ARGS)

test: setup
	$(TEST_ENV) $(PY) -m pytest -q tests $(ARGS)

# The quick set (a few minutes on 2 cores): one row per baseline family at the quoted shapes.
bench: setup
	$(TEST_ENV) $(PY) -m pytest bench/ --benchmark-only $(ARGS)

# Every benchmark: all option sets, bf16, V = 151,936, the larger encoder, DDP vs FSDP (~25 min).
bench-full: setup
	$(TEST_ENV) $(PY) -m pytest bench/ --benchmark-only --bench-full $(ARGS)

# What a user of the library does: a plain `pip install .` (pip's build isolation, no torch in
# the build) into a fresh virtualenv without system packages, then one loss call, which builds
# the C++ extension just in time. Everything stays in .cache/; slow (minutes).
INSTALL_VENV := .cache/install-venv
check-install:
	rm -rf $(INSTALL_VENV) .cache/install-ext
	$(PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/python tools/deps.py constraints $(LOCK) > .cache/install-constraints.txt
	$(INSTALL_VENV)/bin/python -m pip install -q -c .cache/install-constraints.txt pip torch
	$(BUILD_ENV) $(INSTALL_VENV)/bin/python -m pip install -q -c .cache/install-constraints.txt .
	cd .cache && QWENRL_EXT_DIR=$(CURDIR)/.cache/install-ext QWENRL_REQUIRE_EXT=1 \
		install-venv/bin/python -c "$$CHECK_INSTALL"

define CHECK_INSTALL
import torch, qwenrl
from qwenrl._ext import extension_error, load_extension
assert "site-packages" in qwenrl.__file__, qwenrl.__file__
assert load_extension() is not None, extension_error()
h, w = torch.randn(64, 32, requires_grad=True), torch.randn(1000, 32, requires_grad=True)
t = torch.randint(0, 1000, (64,))
loss = qwenrl.linear_efe_loss(h, w, t, tau=0.0, easy_weight=1.0)
loss.backward()
ref = torch.nn.functional.cross_entropy(h @ w.T, t)
assert abs(loss.item() - ref.item()) < 1e-4, (loss.item(), ref.item())
print("installed qwenrl", qwenrl.__version__, "loss", loss.item(), "extension", load_extension().__file__)
endef
export CHECK_INSTALL

# On a CUDA machine: Triton tests on the GPU, GPU benchmarks, a one-minute GPU training run.
gpu-check: setup
	$(PY) -m pip install -q -c $(CONSTRAINTS) liger-kernel || echo "liger-kernel could not be installed: its rows are skipped"
	PY=$(PY) bash bench/gpu_check.sh

# Mutation testing of the trainer, the RL policy, the loss API and its linear form, the
# Hugging Face patch, test-time training, voting, evaluation and the dataset (scope and test
# selection: [tool.mutmut] in pyproject.toml), with a kill rate per module at the end. Not part
# of `make test`. By default one mutant in five (those numbered ...0 and ...5: a systematic
# sample over every function and kind of mutation), over an hour on 2 cores for today's scope;
# MUTANTS='*' runs all of them (about 5 times longer); docs/testing.md has a per-module sample.
# Afterwards `.venv/bin/mutmut results` lists the survivors, `.venv/bin/mutmut show NAME`
# shows one.
MUTANTS ?= *__mutmut_*[05]
mutate: setup
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(MUTMUT_PIN)"
	rm -rf mutants && mkdir mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)') \
	  > mutants/run.log 2>&1 \
	  || { tail -n 30 mutants/run.log; exit 1; }
	$(VENV)/bin/mutmut export-cicd-stats
	$(PY) -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
	  k, t = s["killed"], s["total"]; \
	  n = sum(s[x] for x in ("killed", "survived", "no_tests", "suspicious", "timeout", "segfault")); \
	  print(f"mutation score: {k} of {n} mutants run killed = {k / max(n, 1):.1%} ({t} in scope)"); \
	  print(s)'
	$(PY) tools/mutation_report.py mutants

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf build *.egg-info qwenrl/_C*.so mutants

# Regenerate requirements.lock: the newest releases pyproject.toml's ranges allow, installed into
# a fresh virtualenv without system packages (torch $(TORCH_LOCK)), then frozen. Run `make test`
# on the result before committing it.
LOCK_VENV := .cache/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
	$(LOCK_VENV)/bin/python -m pip install -q "torch==$(TORCH_LOCK)"
	$(LOCK_VENV)/bin/python -m pip install -q ".[dev,plot]"
	$(LOCK_VENV)/bin/python tools/deps.py freeze > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); now run: make test"

# The suite against the newest releases, in a throwaway virtualenv (.cache/latest-venv), so an
# upstream break shows here before a user meets it. torch stays at $(TORCH_LOCK) (PyPI's newest
# torch is a CUDA build of several GB): LATEST_TORCH=torch takes the newest one too.
LATEST_VENV := .cache/latest-venv
LATEST_TORCH ?= torch==$(TORCH_LOCK)
test-latest: BUILD_WARNINGS = error
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel ninja numpy
	$(LATEST_VENV)/bin/python -m pip install -q "$(LATEST_TORCH)"
	$(BUILD_ENV) $(LATEST_VENV)/bin/python -m pip install \
	  -q --upgrade --upgrade-strategy eager -e ".[dev,plot]" --no-build-isolation
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|kernels|tokenizers|huggingface.hub|triton|numpy)=='
	$(TEST_ENV) $(LATEST_VENV)/bin/python -m pytest -q tests $(ARGS)

# The suite against the floors of pyproject.toml's ranges (uv's lowest-direct resolution: every
# direct dependency at its lowest allowed release, torch at $(TORCH_LOCK)), in a throwaway
# virtualenv (.cache/floor-venv), so that a floor is a tested version and not a guess.
FLOOR_VENV := .cache/floor-venv
UV_VENV := .cache/uv-venv
# uv does not read pip's configuration: hand it pip's local wheel folder (the CPU torch), if any.
FIND_LINKS = $(foreach d,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(d))
test-floors:
	rm -rf $(FLOOR_VENV)
	test -x $(UV_VENV)/bin/uv || { $(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q uv; }
	$(UV_VENV)/bin/uv venv -q --python $(PYTHON) $(FLOOR_VENV)
	$(UV_VENV)/bin/uv pip install -q --python $(FLOOR_VENV)/bin/python $(FIND_LINKS) \
	  "torch==$(TORCH_LOCK)" setuptools wheel ninja
	@# numpy comes with the rest, at its floor (torch's import only warns until then).
	$(UV_VENV)/bin/uv pip install -q --python $(FLOOR_VENV)/bin/python $(FIND_LINKS) \
	  --resolution lowest-direct "torch==$(TORCH_LOCK)" -e ".[dev,plot]" --no-build-isolation
	$(UV_VENV)/bin/uv pip freeze --python $(FLOOR_VENV)/bin/python | \
	  grep -iE '^(torch|numpy|transformers|tokenizers|accelerate|triton|matplotlib|pytest)=='
	$(TEST_ENV) $(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider tests $(ARGS)

# No GPU needed: compile every Triton kernel variant for sm_80/sm_90 (sm_100 where the bundled
# ptxas has it) and check registers, spills and shared memory (bench/gpu_compile.py, ~2 min).
gpu-compile: setup
	$(PY) bench/gpu_compile.py
