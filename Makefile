# Thin wrapper over CMake.  `make demo` and `make test` do all set-up on a
# fresh Debian 12 machine (packages are installed by `make deps`).
BUILD ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
ifeq ($(SANITIZE),1)
BUILD := build-asan
CMAKE_FLAGS += -DSANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
endif

.PHONY: all build deps test demo bench clean install

all: build

deps:
	@./scripts/deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: deps
	$(MAKE) build
	cd $(BUILD) && ctest --output-on-failure -j 2 --timeout 600

demo: deps
	$(MAKE) build
	$(BUILD)/bin/rbe playbooks/demo.lua --state-dir $(BUILD)/demo-state --reason "make demo"

bench: deps
	$(MAKE) build
	./bench/run.sh $(BUILD)/bin/rbe

install: build
	cmake --install $(BUILD)

clean:
	rm -rf build build-asan
