# The engine's build, in llm.c's spirit.
#   make train_moe_cpu     the CPU twin (fp32, OpenMP)
#   make test              the whole test suite; its last line is "N passed, M failed"
#   make demo              data -> dense GPT-2 -> upcycled MoE -> dense vs MoE validation loss
# Overridable: CXX, OPTFLAGS (default -O3 -march=native), NO_OMP=1 (build without OpenMP),
# PYTHON (a python3 with torch, for the tests).
CXX ?= g++
OPTFLAGS ?= -O3 -march=native
WARNFLAGS = -Wall -Wextra -Wno-unused-parameter -Wno-unused-function
CXXFLAGS ?= $(OPTFLAGS) $(WARNFLAGS) -std=c++17
ifeq ($(NO_OMP),1)
  OMPFLAGS =
else
  OMPFLAGS = -fopenmp
endif
COMMON_HEADERS = $(wildcard common/*.h)

.PHONY: all test demo clean

all: train_moe_cpu

train_moe_cpu: train_moe_cpu.cpp $(COMMON_HEADERS)
	$(CXX) $(CXXFLAGS) $(OMPFLAGS) -o $@ $< -lm

test_moe_cpu: test_moe_cpu.cpp train_moe_cpu.cpp $(COMMON_HEADERS)
	$(CXX) $(CXXFLAGS) $(OMPFLAGS) -o $@ $< -lm

test:
	bash tests/run_tests.sh

demo: train_moe_cpu
	bash scripts/demo.sh

clean:
	rm -f train_moe_cpu test_moe_cpu
