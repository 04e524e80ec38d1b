# pcache build. `make` builds build/pcache; `make test` installs what is missing, fetches the
# model, builds with ASan+UBSan and runs the C and Python suites; `make bench` compares with
# llama.cpp. BUILD=dir keeps parallel builds apart (each helper/agent may use its own).
BUILD    ?= build
CC       ?= gcc
SAN      ?=
OPT      ?= -O2
ARCHFLAGS ?= -march=native
PKGS     := libcjson libmicrohttpd libpcre2-8 zlib hiredis libcurl
CFLAGS   ?= $(OPT) -g
# EXTRA_CFLAGS / EXTRA_LDFLAGS: libraries unpacked outside /usr (scripts/gpu-machine.sh).
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lcjson -lmicrohttpd -lpcre2-8 -lz -lhiredis -lcurl)
CFLAGS   += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -Wshadow -fno-math-errno \
            -fno-strict-aliasing -pthread $(ARCHFLAGS) $(SAN) -Isrc $(EXTRA_CFLAGS) \
            $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS   += $(PKG_LIBS) -lm -pthread
LDFLAGS  += $(SAN) $(EXTRA_LDFLAGS)
MODEL    ?= models/SmolLM2-135M-Instruct.Q4_1.gguf

# The CUDA backend (src/cuda/*.cu) is built when nvcc is found; `make CUDA=0` skips it and
# links src/gpu_none.c instead. The CUDA runtime is linked statically, so the binary runs (on the
# CPU) where there is no GPU or driver. sm_90a machine code for Hopper, PTX for other GPUs.
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA     ?= $(if $(NVCC),1,0)
CUDA_ARCH ?= -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80
ifeq ($(CUDA),1)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
GPU_OBJ  := $(patsubst src/cuda/%.cu,$(BUILD)/obj/cuda/%.o,$(wildcard src/cuda/*.cu))
LIB_SRC  := $(filter-out src/main.c src/tool.c src/gpu_none.c,$(wildcard src/*.c))
LDLIBS   += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lstdc++
else
GPU_OBJ  :=
LIB_SRC  := $(filter-out src/main.c src/tool.c,$(wildcard src/*.c))
endif
LIB_OBJ  := $(LIB_SRC:src/%.c=$(BUILD)/obj/%.o) $(GPU_OBJ)
TEST_SRC := $(wildcard tests/c/test_*.c)
TEST_BIN := $(TEST_SRC:tests/c/%.c=$(BUILD)/tests/%)
CHECK_LIBS := $(shell pkg-config --libs check 2>/dev/null)

.PHONY: all deps model test test-c test-py test-gpu test-gpu-server bench-gpu run serve bench soak fuzz clean distclean asan
all: $(BUILD)/pcache $(BUILD)/pcache-tool

$(BUILD)/obj/%.o: src/%.c $(wildcard src/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/cuda/%.o: src/cuda/%.cu $(wildcard src/*.h)
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Isrc -Xcompiler -fno-strict-aliasing -c $< -o $@

$(BUILD)/libpcache.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/pcache: $(BUILD)/obj/main.o $(BUILD)/libpcache.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/pcache-tool: $(BUILD)/obj/tool.o $(BUILD)/libpcache.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/c/%.c $(BUILD)/libpcache.a $(wildcard tests/c/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -Itests/c -o $@ $< $(BUILD)/libpcache.a $(CHECK_LIBS) $(LDLIBS)

# Set-up, one level per job (scripts/install-deps.sh): serving needs only the build packages;
# the tests add Check, the fuzzer runtime, Python packages and the llama.cpp oracle (pinned
# kernels, .deps/llama-oracle); the benchmarks add the llama.cpp peer (native, .deps/llama-peer).
deps: .deps/serve.stamp
.deps/serve.stamp: scripts/install-deps.sh
	bash scripts/install-deps.sh serve
	@mkdir -p .deps && touch $@
.deps/test.stamp: scripts/install-deps.sh scripts/install-llama.sh requirements-test.txt
	bash scripts/install-deps.sh test
	@mkdir -p .deps && touch $@
.deps/bench.stamp: scripts/install-deps.sh scripts/install-llama.sh requirements-test.txt requirements-bench.txt
	bash scripts/install-deps.sh bench
	@mkdir -p .deps && touch $@
ORACLE_PY := $(CURDIR)/.deps/llama-oracle
PEER_PY   := $(CURDIR)/.deps/llama-peer

model: $(MODEL)
$(MODEL):
	bash scripts/fetch-model.sh $@

# The test suite: everything built with AddressSanitizer + UndefinedBehaviorSanitizer.
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
test: .deps/test.stamp model
	$(MAKE) fuzz FUZZ_SECONDS=20
	$(MAKE) soak SOAK_SECONDS=60 SOAK_OUT=build/soak_ci.json
	$(MAKE) BUILD=build/asan SAN="$(SANFLAGS)" OPT=-O1 test-c test-py

# Short coverage-guided fuzzing runs of the parsers (libFuzzer, ASan+UBSan).
FUZZ_SECONDS ?= 60
fuzz:
	bash scripts/fuzz-gguf.sh $(FUZZ_SECONDS)
	bash scripts/fuzz-api.sh $(FUZZ_SECONDS)
	bash scripts/fuzz-kvfile.sh $(FUZZ_SECONDS)
	bash scripts/fuzz-jsonschema.sh $(FUZZ_SECONDS)
	bash scripts/fuzz-cluster.sh $(FUZZ_SECONDS)

test-c: $(TEST_BIN) $(BUILD)/pcache $(BUILD)/pcache-tool
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; CK_FORK=no ASAN_OPTIONS=detect_leaks=1 $$t; done

test-py: $(BUILD)/pcache $(BUILD)/pcache-tool
	PYTHONPATH=$(ORACLE_PY) PCACHE_ORACLE=$(ORACLE_PY) PCACHE_BUILD=$(BUILD) PCACHE_MODEL=$(MODEL) \
	  python3 -m pytest -q tests/py

NPROC := $(shell nproc 2>/dev/null || echo 2)
serve: deps model
	$(MAKE) -j$(NPROC) all
	$(BUILD)/pcache serve -m $(MODEL) --host 127.0.0.1 --port 8080

run: deps model
	$(MAKE) -j$(NPROC) all
	$(BUILD)/pcache run --chat -n 64 "What is prompt caching, in one sentence?"

bench: .deps/bench.stamp model
	$(MAKE) all
	PYTHONPATH=$(PEER_PY) python3 bench/bench.py --model $(MODEL) --pcache $(BUILD)/pcache
	-$(MAKE) $(BUILD)/tests/test_prefix
	PYTHONPATH=$(PEER_PY) python3 bench/bench_cache.py --model $(MODEL) --pcache $(BUILD)/pcache
	PYTHONPATH=$(PEER_PY) python3 bench/bench_server.py --model $(MODEL) --pcache $(BUILD)/pcache
	python3 bench/bench_tiers.py --model $(MODEL) --pcache $(BUILD)/pcache
	$(BUILD)/pcache-tool bench-grammar $(MODEL) bench/schema_planets.json | tee bench/grammar_results.json

# The server under load (bench/soak.py): 64 clients, a quarter-size KV pool, disconnects.
# In `make test` (CI) it runs 60 s of load on the optimized build, before the sanitizer suite
# (whose summary closes the output); what is in flight then must still finish (--drain-timeout).
SOAK_SECONDS ?= 600
SOAK_OUT ?= bench/soak_results.json
soak: .deps/test.stamp model
	$(MAKE) -j$(NPROC) all
	python3 bench/soak.py --pcache $(BUILD)/pcache --model $(MODEL) --duration $(SOAK_SECONDS) \
	  --drain-timeout 900 --request-timeout 1200 --out $(SOAK_OUT)

# The GPU suite, on a machine with an NVIDIA GPU (README: GPU): the CUDA backend against the CPU
# backend, kernel by kernel and end to end, and its cache transparency. Needs numpy, gguf and
# pytest in python3 (scripts/gpu-machine.sh carries them to a machine without a registry).
$(BUILD)/tests/gpu_engine_check: tests/gpu/gpu_engine_check.c $(BUILD)/libpcache.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libpcache.a $(LDLIBS)
test-gpu: all $(BUILD)/tests/gpu_engine_check
	PCACHE_BUILD=$(BUILD) PCACHE_MODEL=$(MODEL) python3 -m pytest -q tests/gpu
# The server suite with the engine on the GPU (needs the model and the clients: README: GPU).
test-gpu-server: all
	PCACHE_BUILD=$(BUILD) PCACHE_MODEL=$(MODEL) PCACHE_SERVE_ARGS="--device cuda" PCACHE_DEVICE=cuda \
	  python3 -m pytest -q tests/py/test_server.py tests/py/test_server_load.py

# What batch invariance costs: the backend's matmul against cuBLAS (bench only; links cuBLAS).
$(BUILD)/gpu_gemm: bench/gpu_gemm.cu $(BUILD)/libpcache.a
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Isrc -c $< -o $(BUILD)/obj/gpu_gemm.o
	$(CC) $(LDFLAGS) -o $@ $(BUILD)/obj/gpu_gemm.o $(BUILD)/libpcache.a $(LDLIBS) -lcublas -Wl,-rpath,$(CUDA_HOME)/lib64

# GPU benchmark against llama.cpp's CUDA build, on the GPU machine (two stages: bench/bench_gpu.sh).
bench-gpu:
	bash bench/bench_gpu.sh 1 && bash bench/bench_gpu.sh 2 && bash bench/bench_gpu.sh 3

clean:
	rm -rf build

distclean: clean
	rm -rf .deps
