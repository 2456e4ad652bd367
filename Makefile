# The engine's build, in llm.c's spirit.
#   make train_moe         the GPU engine (PRECISION=BF16 default, or PRECISION=FP32)
#   make train_moe_cpu     the CPU twin (fp32, OpenMP)
#   make test              the whole test suite; its last line is "N passed, M failed"
#   make demo              data -> dense GPT-2 -> upcycled MoE -> dense vs MoE validation loss
# Overridable: CXX, OPTFLAGS (default -O3 -march=native), NO_OMP=1 (build without OpenMP),
# PYTHON (a python3 with torch, for the tests); for CUDA: NVCC, PRECISION, GPU_ARCH (detected
# with nvidia-smi, sm_90 when there is nothing to detect), GPU_ARCHS (several, e.g. "80 90",
# for one binary that runs on both), BUILD (the folder train_moe and test_moe go to).
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

NVCC ?= nvcc
PRECISION ?= BF16
GPU_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d .)
ifeq ($(GPU_ARCH),)
  GPU_ARCH = 90
endif
GPU_ARCHS ?= $(GPU_ARCH)
# sm_90 is built as sm_90a: the same GPUs (H100, H200), and Hopper's own instructions too, which
# version 3 of the expert GEMMs takes (--expert-gemm 3, kernels/wgmma.cuh)
comma := ,
gencode = $(if $(filter 90,$(1)),-gencode arch=compute_90a$(comma)code=sm_90a -DENABLE_WGMMA,-gencode arch=compute_$(1)$(comma)code=sm_$(1))
NVCCFLAGS = -O3 -std=c++17 -lineinfo -Xcompiler -Wall,-Wno-unused-function,-fopenmp \
            $(foreach a,$(GPU_ARCHS),$(call gencode,$(a)))
ifeq ($(PRECISION),FP32)
  NVCCFLAGS += -DENABLE_FP32
else ifneq ($(PRECISION),BF16)
  $(error PRECISION must be BF16 or FP32, not $(PRECISION))
endif
CUDA_LIBS = -lcublasLt -lcublas -lgomp
CUDA_HEADERS = $(wildcard kernels/*.cuh)
BUILD ?= .

.PHONY: all test demo clean train_moe test_moe

all: train_moe_cpu

train_moe_cpu: train_moe_cpu.cpp $(COMMON_HEADERS)
	$(CXX) $(CXXFLAGS) $(OMPFLAGS) -o $@ $< -lm

test_moe_cpu: test_moe_cpu.cpp train_moe_cpu.cpp tests/test_common.h $(COMMON_HEADERS)
	$(CXX) $(CXXFLAGS) $(OMPFLAGS) -o $@ $< -lm

# always rebuilt: the same name serves both precisions and any architecture
# PTXAS_REPORT=DIR: also ptxas's resource report of every kernel (on stderr) and the PTX kept in
# DIR, which tests/kernel_resources.py reads
train_moe: train_moe.cu $(COMMON_HEADERS) $(CUDA_HEADERS)
	$(if $(PTXAS_REPORT),mkdir -p $(PTXAS_REPORT))
	$(NVCC) $(NVCCFLAGS) $(if $(PTXAS_REPORT),-Xptxas -v --keep --keep-dir $(PTXAS_REPORT)) -o $(BUILD)/train_moe $< $(CUDA_LIBS)

test_moe: test_moe.cu train_moe.cu tests/test_common.h $(COMMON_HEADERS) $(CUDA_HEADERS)
	$(NVCC) $(NVCCFLAGS) -o $(BUILD)/test_moe $< $(CUDA_LIBS)

test:
	bash tests/run_tests.sh

demo: train_moe_cpu
	bash scripts/demo.sh

clean:
	rm -f train_moe_cpu test_moe_cpu train_moe test_moe
