#!/usr/bin/env python3
"""Rewrites the GPU engine's sources so that a C++ compiler builds them against tests/emu/cuda_emu.h
(the CPU emulation of CUDA). The product's files are not touched: the rewritten copies go to OUT.

    translate.py ROOT OUT      # copies train_moe.cu, test_moe.cu, kernels/, common/, tests/test_common.h,
                               # train_moe_cpu.cpp, the kernel studies of dev/cuda and tests/emu/{races,sanitize}.cu

Rewrites, in .cu and .cuh files only:
  kernel<<<grid, block[, shared[, stream]]>>>(args)  ->  emu::launch(emu::kernel_id(kernel), dim3(grid), dim3(block), shared,
                                                                   [&]() { kernel(args); })
  extern __shared__ [__align__(n)] T name[];         ->  T* name = (T*)emu::dynamic_shared();
  __shared__ T name[dims];                           ->  static T name[dims]; emu::shared_at_block_start(&name, sizeof(name));
  asm volatile("ptx" : outputs : inputs);             ->  emu::ptx("ptx", {emu::out(..), .., emu::in(..), ..});
  __global__ void __launch_bounds__(N) name(..) {    ->  __global__ void name(..) { emu::launch_bounds(N, "name");
  #include <cuda_runtime.h> and the other CUDA headers -> removed (cuda_emu.h is force-included)
"""
import os
import re
import shutil
import sys

CUDA_INCLUDES = re.compile(r'^\s*#include\s*<(cuda_runtime|cuda_bf16|cuda_fp16|cublasLt|cublas_v2|cuda)\.h>\s*$', re.M)
EXTERN_SHARED = re.compile(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;')
STATIC_SHARED = re.compile(r'__shared__\s+([A-Za-z_][\w\s]*?)\s+(\w+)\s*((?:\[[^\];]+\])*)\s*;')


def matching(text, i, open_ch, close_ch):
    """index of the bracket closing the one at text[i]"""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_ch:
            depth += 1
        elif text[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced %s at %d" % (open_ch, i))


def split_top_level(text, separator=','):
    """the parts of text between separators outside brackets and string literals"""
    parts, depth, start, in_string = [], 0, 0, False
    for i, ch in enumerate(text):
        if in_string:
            if ch == '"' and text[i - 1] != '\\':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in '([{':
            depth += 1
        elif ch in ')]}':
            depth -= 1
        elif ch == separator and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def kernel_name_start(text, end):
    """start of the kernel expression that ends just before text[end] (a name, maybe name<...>)"""
    i = end
    if text[i - 1] == '>':  # template arguments
        depth = 0
        i -= 1
        while True:
            if text[i] == '>':
                depth += 1
            elif text[i] == '<':
                depth -= 1
                if depth == 0:
                    break
            i -= 1
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in '_:'):
        i -= 1
    return i


def rewrite_launches(text):
    out, pos = [], 0
    while True:
        i = text.find('<<<', pos)
        if i < 0:
            out.append(text[pos:])
            return ''.join(out)
        start = kernel_name_start(text, i)
        name = text[start:i].strip()
        j = text.find('>>>', i)
        config = split_top_level(text[i + 3:j])
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != '(':
            raise ValueError("launch of %s without arguments" % name)
        close = matching(text, k, '(', ')')
        args = text[k + 1:close]
        shared = config[2] if len(config) > 2 else '0'
        out.append(text[pos:start])
        out.append('emu::launch(emu::kernel_id(%s), dim3(%s), dim3(%s), (size_t)(%s), [&]() { %s(%s); })'
                   % (name, config[0], config[1], shared, name, args))
        pos = close + 1


def asm_operands(section):
    """[(constraint, expression)] of an operand list such as '"+f"(d[0]), "r"(a)'"""
    if not section:
        return []
    operands = []
    for operand in split_top_level(section):
        m = re.match(r'"([^"]*)"\s*\((.*)\)$', operand, re.S)
        if not m:
            raise ValueError("asm operand not understood: %s" % operand)
        operands.append((m.group(1), m.group(2)))
    return operands


def rewrite_matches(text, pattern, rewrite):
    """text with every match of pattern rewritten, each search starting where the last rewrite
    ended: rewrite(m) gives (start, replacement, end), the replacement of text[start:end]"""
    out, pos = [], 0
    while True:
        m = pattern.search(text, pos)
        if not m:
            out.append(text[pos:])
            return ''.join(out)
        start, replacement, end = rewrite(m)
        out.append(text[pos:start])
        out.append(replacement)
        pos = end


def rewrite_asm(text):
    """asm volatile("template" : outputs : inputs : clobbers) -> emu::ptx("template", {operands});
    outputs by address (emu::out), inputs by value (emu::in), in the template's %0, %1, .. order"""
    def rewrite(m):
        close = matching(text, m.end() - 1, '(', ')')
        sections = split_top_level(text[m.end():close], ':')
        template = sections[0]
        outputs = asm_operands(sections[1]) if len(sections) > 1 else []
        inputs = asm_operands(sections[2]) if len(sections) > 2 else []
        args = ['emu::out(%s)' % e for _, e in outputs] + ['emu::in(%s)' % e for _, e in inputs]
        return m.start(), 'emu::ptx(%s, {%s})' % (template, ', '.join(args)), close + 1
    return rewrite_matches(text, re.compile(r'\basm\s+volatile\s*\('), rewrite)


def rewrite_launch_bounds(text):
    """__global__ void __launch_bounds__(N) name(params) { -> __global__ void name(params) {
    emu::launch_bounds(N, "name"); (a launch of more threads is an error, as on a GPU)"""
    def rewrite(found):
        open_bounds = found.end() - 1
        close_bounds = matching(text, open_bounds, '(', ')')
        bounds = text[open_bounds + 1:close_bounds]
        m = re.compile(r'\s*(\w+)\s*\(').match(text, close_bounds + 1)
        if not m:
            raise ValueError("__launch_bounds__ not followed by a kernel's name at %d" % found.start(1))
        body = text.index('{', matching(text, m.end() - 1, '(', ')'))
        # the same lines after it: the sanitizer reports line numbers
        check = ' emu::launch_bounds((unsigned long long)(%s), "%s");' % (bounds, m.group(1))
        return found.start(1), text[close_bounds + 1:body + 1] + check, body + 1
    return rewrite_matches(text, re.compile(r'__global__\s+void\s+(__launch_bounds__)\s*\('), rewrite)


def translate(text):
    text = CUDA_INCLUDES.sub('', text)
    text = EXTERN_SHARED.sub(lambda m: '%s* %s = (%s*)emu::dynamic_shared();' % (m.group(1), m.group(2), m.group(1)), text)
    text = STATIC_SHARED.sub(lambda m: 'static %s %s%s; emu::shared_at_block_start(&%s, sizeof(%s));'
                             % (m.group(1), m.group(2), m.group(3), m.group(2), m.group(2)), text)
    text = rewrite_asm(text)
    text = rewrite_launch_bounds(text)
    return rewrite_launches(text)


def main():
    root, out = sys.argv[1], sys.argv[2]
    files = ['train_moe.cu', 'test_moe.cu', 'tests/test_common.h', 'train_moe_cpu.cpp', 'tests/emu/races.cu', 'tests/emu/sanitize.cu']
    for folder in ('kernels', 'common', 'dev/cuda'):
        files += [os.path.join(folder, f) for f in sorted(os.listdir(os.path.join(root, folder)))
                  if f.endswith(('.cu', '.cuh', '.h'))]
    for rel in files:
        src, dst = os.path.join(root, rel), os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel.endswith(('.cu', '.cuh')):
            with open(src) as f:
                text = f.read()
            with open(dst, 'w') as f:
                f.write(translate(text))
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    main()
