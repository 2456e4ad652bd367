#!/usr/bin/env python3
"""
The PyTorch reference of the MoE engine: llm.c's GPT-2, upcycled into a Mixture of Experts.

It is the source of truth the CPU twin (train_moe_cpu) and the CUDA engine are tested against:
the same model, upcycling (with the same counter-based random numbers, bit for bit), routing,
auxiliary losses and AdamW, with every gradient from autograd. The specification is
doc/formats.md, doc/upcycling.md and doc/routing.md; the comments below cite them.

    python3 dev/train_moe.py make-dense --model L:C:NH:maxT --vocab V [--seed S] [--jitter J] -o FILE
    python3 dev/train_moe.py make-shard --vocab V --tokens N [--seed S] -o FILE
    python3 dev/train_moe.py debug -m CKPT -i SHARD -b B -t T --steps N --state OUT [--write-model FILE] [options]
    python3 dev/train_moe.py bench -m CKPT -i SHARD -b B -t T --steps N [options]
    python3 dev/train_moe.py upcycle -m DENSE --write-model FILE [MoE options]

`-m` is a dense llm.c checkpoint (upcycled when -e > 1), an MoE checkpoint (used as it is; its
routing options can be overridden), or a shape (d12, or L:C:NH:maxT) built fresh, with --vocab
words (default 50257, as in the engines).
Runs on the CPU with Debian's torch 1.13 (and trixie's torch 2.6: tests/newer_torch.sh), and on
a GPU with torch 2.x (--device cuda, no TF32).
"""
import argparse
import math
import os
import re
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DENSE_MAGIC = 20240326
MOE_MAGIC = 20261122
MOE_VERSION = 1
SHARD_MAGIC = 20240520
DEBUG_MAGIC = 20261124
MAX_LAYERS = 224  # the MoE header holds one flag per layer in slots 32..255


class InputError(Exception):
    """A bad input or option: main prints the message as one line and exits 1."""


def fail(msg):
    raise InputError(msg)


# ----------------------------------------------------------------------------
# the model's shape and the parameter layout (doc/formats.md, the MoE checkpoint's table)

PARAMETER_NAMES = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
                   "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
                   "routerw", "expert_fcw", "expert_fcb", "expert_fcprojw", "expert_fcprojb"]
(P_WTE, P_WPE, P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB, P_LN2W, P_LN2B,
 P_FCW, P_FCB, P_FCPROJW, P_FCPROJB, P_LNFW, P_LNFB,
 P_ROUTERW, P_EXPERT_FCW, P_EXPERT_FCB, P_EXPERT_FCPROJW, P_EXPERT_FCPROJB) = range(21)
DECAYED = {P_WTE, P_WPE, P_QKVW, P_ATTPROJW, P_FCW, P_FCPROJW, P_ROUTERW, P_EXPERT_FCW, P_EXPERT_FCPROJW}
RESIDUAL_PROJECTIONS = {P_ATTPROJW, P_FCPROJW, P_EXPERT_FCPROJW}
BIASES = {P_LN1B, P_QKVB, P_ATTPROJB, P_LN2B, P_FCB, P_FCPROJB, P_LNFB, P_EXPERT_FCB, P_EXPERT_FCPROJB}
LAYERNORM_WEIGHTS = {P_LN1W, P_LN2W, P_LNFW}

ROUTERS = ["topk", "expert"]        # header slot 14: 0 token choice, 1 expert choice
PRIORITIES = ["order", "score"]     # header slot 16
INITS = ["copy", "drop", "noise", "scratch"]  # header slot 17


class Config:
    """GPT-2 dimensions, which layers are MoE, and the routing options."""

    def __init__(self, maxT, V, Vp, L, NH, C):
        self.maxT, self.V, self.Vp, self.L, self.NH, self.C = maxT, V, Vp, L, NH, C
        self.E = 1              # experts per MoE layer, 1 = dense
        self.k = 1              # experts per token (token choice)
        self.G = 1              # granularity: each expert holds H = 4C/G hidden units
        self.moe = [False] * L  # moe[l]: layer l is an MoE layer
        self.renorm = 1
        self.router = 0         # index into ROUTERS
        self.cf = 0.0           # capacity factor, an fp32 value; <= 0 is dropless
        self.priority = 0       # index into PRIORITIES
        self.init = 0           # index into INITS (information only)

    @property
    def H(self):
        return 4 * self.C // self.G

    @property
    def Lm(self):
        return sum(self.moe)

    @property
    def Ld(self):
        return self.L - self.Lm

    def moe_slot(self, l):
        """index of layer l among the MoE layers"""
        return sum(self.moe[:l])

    def dense_slot(self, l):
        """index of layer l among the dense layers"""
        return l - sum(self.moe[:l])

    def moe_layer_list(self):
        return [l for l in range(self.L) if self.moe[l]]


def parameter_shapes(cfg):
    C, L, Vp, maxT, Ld, Lm, E, H = cfg.C, cfg.L, cfg.Vp, cfg.maxT, cfg.Ld, cfg.Lm, cfg.E, cfg.H
    if cfg.E == 1:
        Lm = E = H = 0
    return [(Vp, C), (maxT, C), (L, C), (L, C), (L, 3 * C, C), (L, 3 * C), (L, C, C), (L, C), (L, C), (L, C),
            (Ld, 4 * C, C), (Ld, 4 * C), (Ld, C, 4 * C), (Ld, C), (C,), (C,),
            (Lm, E, C), (Lm, E, H, C), (Lm, E, H), (Lm, E, C, H), (Lm, E, C)]


def count_parameters(cfg):
    return sum(int(np.prod(s)) for s in parameter_shapes(cfg))


def validate_dimensions(cfg, what):
    if not 1 <= cfg.L <= MAX_LAYERS:
        fail(f"{what}: L={cfg.L} layers, expected 1..{MAX_LAYERS}")
    if not 1 <= cfg.C <= 32768:
        fail(f"{what}: C={cfg.C} channels, expected 1..32768")
    if cfg.NH < 1 or cfg.C % cfg.NH != 0:
        fail(f"{what}: NH={cfg.NH} heads does not divide C={cfg.C} channels")
    if not 1 <= cfg.V <= (1 << 22):
        fail(f"{what}: V={cfg.V}, expected 1..{1 << 22}")
    if not cfg.V <= cfg.Vp <= (1 << 22):
        fail(f"{what}: padded vocabulary Vp={cfg.Vp}, expected V={cfg.V}..{1 << 22}")
    if not 1 <= cfg.maxT <= (1 << 20):
        fail(f"{what}: maxT={cfg.maxT} positions, expected 1..{1 << 20}")


def validate_moe(cfg, what):
    """Checks the MoE fields: E a multiple of G, 1 <= k <= E, and no k = 1 with renorm 1."""
    if cfg.E == 1:
        return
    if not 2 <= cfg.E <= 1024:
        fail(f"{what}: E={cfg.E} experts, expected 1..1024")
    if cfg.G < 1 or cfg.E % cfg.G != 0:
        fail(f"{what}: E={cfg.E} experts is not a multiple of the granularity G={cfg.G}")
    if (4 * cfg.C) % cfg.G != 0:
        fail(f"{what}: granularity G={cfg.G} does not divide the hidden size 4C={4 * cfg.C}")
    if cfg.router == 0 and not 1 <= cfg.k <= cfg.E:
        fail(f"{what}: top-k k={cfg.k} must be between 1 and E={cfg.E}")
    if cfg.router == 0 and cfg.k == 1 and cfg.renorm == 1:
        fail(f"{what}: k=1 with --renorm 1 makes every combine weight 1, so the router gets no gradient; "
             "use --renorm 0")
    if cfg.Lm < 1:
        fail(f"{what}: E={cfg.E} experts but no layer is an MoE layer")


def select_moe_layers(spec, L):
    """--moe-layers: every2 | all | lastN | a comma list -> one flag per layer (doc/upcycling.md)."""
    if spec == "every2":
        if L < 2:
            fail(f"--moe-layers every2 selects layers 1, 3, ...: a {L}-layer model has none; use all")
        return [l % 2 == 1 for l in range(L)]
    if spec == "all":
        return [True] * L
    m = re.fullmatch(r"last(\d+)", spec)
    if spec.startswith("last"):
        if not m or not 1 <= int(m.group(1)) <= L:
            fail(f"--moe-layers {spec}: expected lastN with N in 1..{L} (the model has {L} layers)")
        n = int(m.group(1))
        return [l >= L - n for l in range(L)]
    flags = [False] * L
    if spec == "":
        fail("--moe-layers is empty")
    for item in spec.split(","):
        if not re.fullmatch(r"-?\d+", item.strip()):
            fail(f"--moe-layers {spec}: expected every2, all, lastN or a comma-separated list of layer indices")
        l = int(item)
        if not 0 <= l < L:
            fail(f"--moe-layers {spec}: layer {l} is out of range for a {L}-layer model (0..{L - 1})")
        if flags[l]:
            fail(f"--moe-layers {spec}: layer {l} is listed twice")
        flags[l] = True
    return flags


# ----------------------------------------------------------------------------
# counter-based random numbers (doc/upcycling.md, "The random numbers"), vectorised in numpy
# uint64 arithmetic: every operation wraps modulo 2^64, which is what mix64 wants.

def mix64(x):
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def random_u64(seed, stream, counters):
    """random_u64(seed, stream, i) for an array of counters i"""
    base = mix64(np.uint64(seed) ^ mix64(np.uint64(stream)))
    return mix64(base ^ np.asarray(counters, dtype=np.uint64))


def random_normal(seed, stream, index):
    """standard normal draws (float64) for an array of element indices: Box-Muller on counters 2i, 2i+1"""
    index = np.asarray(index, dtype=np.uint64)
    a = random_u64(seed, stream, index * np.uint64(2))
    b = random_u64(seed, stream, index * np.uint64(2) + np.uint64(1))
    u1 = 1.0 - (a >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # (0, 1]
    u2 = (b >> np.uint64(11)).astype(np.float64) * 2.0 ** -53        # [0, 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def rng_stream(purpose, layer, expert, which):
    return (purpose << 56) | (layer << 40) | (expert << 24) | which


RNG_ROUTER, RNG_UNIT_SET, RNG_DROP_VALUES, RNG_NOISE_VALUES, RNG_SAMPLER, RNG_SCRATCH = 1, 2, 3, 4, 5, 6


def normal_tensor(seed, stream, shape, std, chunk=1 << 22):
    """std * normal(seed, stream, i) for every flat index i of a tensor, in double, rounded once to fp32"""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk), dtype=np.uint64)
        out[start:start + len(idx)] = (std * random_normal(seed, stream, idx)).astype(np.float32)
    return out.reshape(shape)


# ----------------------------------------------------------------------------
# initialisation: GPT-2 from scratch and upcycling (doc/upcycling.md)

def init_scratch(cfg, seed, router_std):
    """Every tensor p of the layout drawn from stream(6, 0, 0, p): weights N(0, 0.02^2), residual
    projections N(0, (0.02/sqrt(2L))^2), router N(0, router_std^2); biases 0, layer-norm weights 1."""
    params = []
    residual_std = 0.02 / math.sqrt(2.0 * cfg.L)
    for p, shape in enumerate(parameter_shapes(cfg)):
        if p in BIASES:
            params.append(np.zeros(shape, dtype=np.float32))
        elif p in LAYERNORM_WEIGHTS:
            params.append(np.ones(shape, dtype=np.float32))
        else:
            std = router_std if p == P_ROUTERW else residual_std if p in RESIDUAL_PROJECTIONS else 0.02
            params.append(normal_tensor(seed, rng_stream(RNG_SCRATCH, 0, 0, p), shape, std))
    return params


def tensor_stats(x):
    """mean and unbiased (n-1) standard deviation of a whole tensor, in double"""
    x = x.astype(np.float64).ravel()
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def choose_unit_set(seed, stream, H, m):
    """the m units of 0..H-1 with the smallest keys random_u64(seed, stream, u), ties to the smaller unit"""
    keys = random_u64(seed, stream, np.arange(H, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    return np.sort(order[:m])


def expert_output_scale(cfg):
    """s of "scale fcw and fcprojw by sqrt(s)": E*G/k for token choice without renorm, else G"""
    if cfg.router == 0 and cfg.renorm == 0:
        return cfg.E * cfg.G / cfg.k
    return float(cfg.G)


def init_expert_units(fcw, fcb, fcprojw, l, e, stats, opt):
    """Step 2 for expert e of layer l: re-draw (drop) or perturb (noise) m = floor(r*H) units, in place.
    fcw (H, C), fcb (H), fcprojw (C, H) are the expert's copied shard."""
    H, C = fcw.shape
    m = int(math.floor(opt.drop_ratio * H))
    if m <= 0:
        return
    seed = opt.seed
    units = [choose_unit_set(seed, rng_stream(RNG_UNIT_SET, l, e, t if opt.drop_mode == "independent" else 0), H, m)
             for t in range(3)]
    drop = opt.init == "drop"
    purpose = RNG_DROP_VALUES if drop else RNG_NOISE_VALUES
    Cu = np.uint64(C)
    Hu = np.uint64(H)

    def redraw(t, old, flat_index):
        n = random_normal(seed, rng_stream(purpose, l, e, t), flat_index)
        if drop:
            mean, std = stats[t]
            return (mean + std * n).astype(np.float32)
        return (old.astype(np.float64) + opt.noise_std * n).astype(np.float32)

    u = units[0].astype(np.uint64)[:, None]          # fcw[u][j], flat index u*C + j
    j = np.arange(C, dtype=np.uint64)[None, :]
    fcw[units[0], :] = redraw(0, fcw[units[0], :], u * Cu + j)
    fcb[units[1]] = redraw(1, fcb[units[1]], units[1].astype(np.uint64))  # fcb[u], flat index u
    o = np.arange(C, dtype=np.uint64)[:, None]       # fcprojw[o][u], flat index o*H + u
    u = units[2].astype(np.uint64)[None, :]
    fcprojw[:, units[2]] = redraw(2, fcprojw[:, units[2]], o * Hu + u)


def upcycle(dense_cfg, dense, cfg, opt):
    """dense parameters (16 tensors of dense_cfg) -> the 21 tensors of the MoE config cfg.
    Per MoE layer and expert: copy shard g = e mod G, drop/noise, scale by sqrt(s), router row of copy e div G."""
    if opt.init == "scratch":
        return init_scratch(cfg, opt.seed, opt.router_std)
    shapes = parameter_shapes(cfg)
    params = [None] * 21
    for p in (P_WTE, P_WPE, P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB, P_LN2W, P_LN2B, P_LNFW, P_LNFB):
        params[p] = dense[p].copy()
    for p in range(P_FCW, P_FCPROJB + 1):
        params[p] = np.zeros(shapes[p], dtype=np.float32)
    for p in range(P_ROUTERW, 21):
        params[p] = np.zeros(shapes[p], dtype=np.float32)
    E, G, H, C = cfg.E, cfg.G, cfg.H, cfg.C
    sqrt_s = math.sqrt(expert_output_scale(cfg))
    scale = opt.weight_scaling == 1 and sqrt_s != 1.0
    for l in range(cfg.L):
        if not cfg.moe[l]:
            ds = cfg.dense_slot(l)
            for p in range(P_FCW, P_FCPROJB + 1):
                params[p][ds] = dense[p][l]
            continue
        ms = cfg.moe_slot(l)
        stats = None
        if opt.init == "drop":
            stats = [tensor_stats(dense[P_FCW][l]), tensor_stats(dense[P_FCB][l]), tensor_stats(dense[P_FCPROJW][l])]
        for e in range(E):
            g = e % G
            fcw = dense[P_FCW][l, g * H:(g + 1) * H, :].copy()         # (H, C)
            fcb = dense[P_FCB][l, g * H:(g + 1) * H].copy()            # (H)
            fcprojw = dense[P_FCPROJW][l, :, g * H:(g + 1) * H].copy() # (C, H)
            fcprojb = dense[P_FCPROJB][l].copy()                       # (C)
            if opt.init in ("drop", "noise"):
                init_expert_units(fcw, fcb, fcprojw, l, e, stats, opt)
            if scale:
                fcw = (fcw.astype(np.float64) * sqrt_s).astype(np.float32)
                fcprojw = (fcprojw.astype(np.float64) * sqrt_s).astype(np.float32)
            params[P_EXPERT_FCW][ms, e] = fcw
            params[P_EXPERT_FCB][ms, e] = fcb
            params[P_EXPERT_FCPROJW][ms, e] = fcprojw
            params[P_EXPERT_FCPROJB][ms, e] = fcprojb
            # the G experts of one dense copy (a virtual group) share one router row
            stream = rng_stream(RNG_ROUTER, l, e // G, 0)
            params[P_ROUTERW][ms, e] = (opt.router_std * random_normal(opt.seed, stream, np.arange(C))).astype(np.float32)
    return params


# ----------------------------------------------------------------------------
# files (doc/formats.md): checkpoints, shards, the debug state

FNV_OFFSET = 0xcbf29ce484222325
FNV_PRIME = 0x100000001b3


def fnv1a64(data, h=FNV_OFFSET, chunk=1 << 20):
    """64-bit FNV-1a of a byte buffer, h = (h ^ byte) * prime per byte, computed without a Python loop
    over the bytes. The low byte l_i of the running hash evolves alone, l_{i+1} = ((l_i ^ b_i) * prime)
    mod 256, and bit j of that product is bit j of (l_i ^ b_i) xor a function of the lower bits only,
    so the sequence of l_i comes out one bit plane at a time by a cumulative xor. Then
    h_i ^ b_i = h_i + d_i with d_i = (l_i ^ b_i) - l_i, and h_n = P^n h_0 + sum_i P^(n-i) d_i mod 2^64."""
    data = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    P = np.uint64(FNV_PRIME)
    plow = FNV_PRIME & 0xFF
    n_max = min(chunk, len(data))
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(n_max + 1, P, dtype=np.uint64))  # powers[i] = P^(i+1)
        powers = np.concatenate([np.ones(1, dtype=np.uint64), powers])  # powers[i] = P^i
        for start in range(0, len(data), chunk):
            b = data[start:start + chunk].astype(np.int64)
            n = len(b)
            l0 = h & 0xFF
            low = np.zeros(n, dtype=np.int64)  # l_i for i = 0..n-1, built bit plane by bit plane
            for j in range(8):
                mask = (1 << j) - 1
                carry = (((low ^ b) & mask) * plow >> j) & 1  # bit j of the product of the lower bits
                step = ((b >> j) & 1) ^ carry                 # bit j of l_{i+1} = bit j of l_i ^ step_i
                acc = np.bitwise_xor.accumulate(step)
                bits = np.empty(n, dtype=np.int64)
                bits[0] = (l0 >> j) & 1
                bits[1:] = ((l0 >> j) & 1) ^ acc[:-1]
                low |= bits << j
            d = ((low ^ b) - low).astype(np.uint64)           # two's complement wrap for negative d
            total = np.sum(powers[n - np.arange(n)] * d, dtype=np.uint64)
            h = int((powers[n] * np.uint64(h) + total) & np.uint64(0xFFFFFFFFFFFFFFFF))
    return h


def fnv1a64_slow(data, h=FNV_OFFSET):
    """the same hash, byte by byte (for the tests)"""
    for byte in bytes(data):
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def atomic_write(path, chunks):
    """write to PATH.tmp, flush, close, rename onto PATH"""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c if isinstance(c, (bytes, bytearray)) else np.ascontiguousarray(c).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def float_bits(x):
    return struct.unpack("<i", struct.pack("<f", x))[0]


def bits_float(i):
    return struct.unpack("<f", struct.pack("<i", i))[0]


def flatten_parameters(params):
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in params])


def unflatten_parameters(flat, cfg):
    params, offset = [], 0
    for shape in parameter_shapes(cfg):
        n = int(np.prod(shape))
        params.append(flat[offset:offset + n].reshape(shape).copy())
        offset += n
    return params


def write_dense_checkpoint(path, cfg, params):
    """llm.c version 3 (fp32): the first 16 tensors"""
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [DENSE_MAGIC, 3, cfg.maxT, cfg.V, cfg.L, cfg.NH, cfg.C, cfg.Vp]
    atomic_write(path, [header, flatten_parameters(params[:16])])


def write_moe_checkpoint(path, cfg, params):
    flat = flatten_parameters(params)
    checksum = fnv1a64(flat.tobytes())
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [MOE_MAGIC, MOE_VERSION, cfg.maxT, cfg.V, cfg.L, cfg.NH, cfg.C, cfg.Vp]
    header[8:18] = [cfg.E, cfg.k, cfg.G, cfg.H, cfg.Lm, cfg.renorm, cfg.router, float_bits(cfg.cf), cfg.priority,
                    cfg.init]
    header[18:20] = np.array([checksum & 0xFFFFFFFF, checksum >> 32], dtype=np.uint32).view(np.int32)
    header[32:32 + cfg.L] = [int(f) for f in cfg.moe]
    atomic_write(path, [header, flat])


def write_checkpoint(path, cfg, params):
    if cfg.E == 1:
        write_dense_checkpoint(path, cfg, params)
    else:
        write_moe_checkpoint(path, cfg, params)


def read_file_with_header(path):
    """The whole file and its int32[256] header; a clear error when there is no header."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    size = os.path.getsize(path)
    if size < 1024:
        fail(f"{path}: truncated: {size} bytes, too small for the 1024-byte header")
    with open(path, "rb") as f:
        raw = f.read()
    return raw, np.frombuffer(raw[:1024], dtype=np.int32)


def read_checkpoint(path):
    """A dense (llm.c v3 fp32 / v5 bf16) or MoE (v1) checkpoint -> (Config, list of 21 fp32 arrays)."""
    raw, header = read_file_with_header(path)
    size = len(raw)
    magic, version = int(header[0]), int(header[1])
    moe = magic == MOE_MAGIC
    if magic != DENSE_MAGIC and not moe:
        fail(f"{path}: bad magic {magic}: not an llm.c model file (magic {DENSE_MAGIC}) "
             f"nor an MoE checkpoint (magic {MOE_MAGIC})")
    if moe and version != MOE_VERSION:
        fail(f"{path}: MoE checkpoint version {version}, this reference reads version {MOE_VERSION}")
    if not moe and version not in (3, 5):
        fail(f"{path}: llm.c model version {version}, expected 3 (fp32) or 5 (bf16)")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    cfg = Config(maxT, V, Vp, L, NH, C)
    validate_dimensions(cfg, path)
    if moe:
        cfg.E, cfg.k, cfg.G = int(header[8]), int(header[9]), int(header[10])
        cfg.renorm, cfg.router = int(header[13]), int(header[14])
        cfg.cf, cfg.priority, cfg.init = bits_float(int(header[15])), int(header[16]), int(header[17])
        if not 2 <= cfg.E <= 1024:
            fail(f"{path}: E={cfg.E} experts, expected 2..1024")
        if cfg.G < 1:
            fail(f"{path}: granularity G={cfg.G}, expected >= 1")
        if cfg.renorm not in (0, 1):
            fail(f"{path}: renorm flag {cfg.renorm}, expected 0 or 1")
        if cfg.router not in (0, 1):
            fail(f"{path}: router kind {cfg.router}, expected 0 or 1")
        if cfg.priority not in (0, 1):
            fail(f"{path}: capacity priority {cfg.priority}, expected 0 or 1")
        if not math.isfinite(cfg.cf):
            fail(f"{path}: capacity factor is not a finite number")
        flags = [int(x) for x in header[32:32 + L]]
        if any(f not in (0, 1) for f in flags):
            fail(f"{path}: MoE layer flags {flags}, expected 0 or 1 each")
        cfg.moe = [f == 1 for f in flags]
        validate_moe(cfg, path)
        if int(header[11]) != cfg.H:
            fail(f"{path}: header says H={int(header[11])} hidden units per expert, but 4C/G = {cfg.H}")
        if int(header[12]) != cfg.Lm:
            fail(f"{path}: header says {int(header[12])} MoE layers but flags {cfg.Lm}")
    bytes_per_value = 2 if (not moe and version == 5) else 4
    n = count_parameters(cfg)
    expected = 1024 + n * bytes_per_value
    if size != expected:
        fail(f"{path}: header says L={L} C={C} NH={NH} V={V} Vp={Vp} maxT={maxT} E={cfg.E} ({n} parameters), "
             f"so {expected} bytes, but the file holds {size} bytes "
             f"({'truncated' if size < expected else 'trailing bytes'})")
    if bytes_per_value == 2:  # bf16: the upper 16 bits of an fp32
        flat = (np.frombuffer(raw, dtype=np.uint16, offset=1024).astype(np.uint32) << 16).view(np.float32)
    else:
        flat = np.frombuffer(raw, dtype=np.float32, offset=1024)
    if moe:
        stored = int(header[18].view(np.uint32)) | (int(header[19].view(np.uint32)) << 32)
        found = fnv1a64(raw[1024:])
        if stored != found:
            fail(f"{path}: checksum mismatch (header {stored:016x}, tensors {found:016x}): the file is corrupt")
    params = unflatten_parameters(flat, cfg)
    for p, t in enumerate(params):
        bad = int(np.count_nonzero(~np.isfinite(t)))
        if bad:
            fail(f"{path}: tensor {PARAMETER_NAMES[p]} holds {bad} non-finite values: the file is corrupt")
    return cfg, params


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [SHARD_MAGIC, 1, len(tokens)]
    atomic_write(path, [header, np.asarray(tokens, dtype=np.uint16)])


def read_shard(path, V):
    raw, header = read_file_with_header(path)
    size = len(raw)
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != 1:
        fail(f"{path}: magic {int(header[0])} version {int(header[1])}, expected a token shard "
             f"(magic {SHARD_MAGIC} version 1)")
    n = int(header[2])
    if n < 0 or size != 1024 + 2 * n:
        fail(f"{path}: header says {n} tokens, so {1024 + 2 * n} bytes, but the file holds {size} bytes")
    tokens = np.frombuffer(raw, dtype=np.uint16, offset=1024).astype(np.int64)
    if n and int(tokens.max()) >= V:
        fail(f"{path}: token {int(tokens.max())} is outside the vocabulary [0, {V})")
    return tokens


def write_debug_state(path, cfg, B, T, R, inputs, targets, logits, losses3, grads, routing, step_losses,
                      params_after):
    """doc/formats.md, "Debug state". routing: per MoE layer (index int32[R], weight fp32[R], kept int32[R])."""
    P = len(grads)
    header = np.zeros(256, dtype=np.int32)
    header[:14] = [DEBUG_MAGIC, 1, B, T, cfg.V, cfg.Vp, cfg.C, cfg.L, cfg.E, cfg.k if cfg.E > 1 else 1, cfg.Lm,
                   len(step_losses), R, cfg.router if cfg.E > 1 else 0]
    header[14:16] = np.array([P & 0xFFFFFFFF, P >> 32], dtype=np.uint32).view(np.int32)
    chunks = [header, np.asarray(inputs, dtype=np.int32), np.asarray(targets, dtype=np.int32),
              np.asarray(logits, dtype=np.float32), np.asarray(losses3, dtype=np.float32),
              np.asarray(grads, dtype=np.float32)]
    for index, weight, kept in routing:
        chunks += [np.asarray(index, dtype=np.int32), np.asarray(weight, dtype=np.float32),
                   np.asarray(kept, dtype=np.int32)]
    chunks += [np.asarray(step_losses, dtype=np.float32), np.asarray(params_after, dtype=np.float32)]
    atomic_write(path, chunks)


def read_debug_state(path):
    """the debug state as a dict (for the tests and for inspection)"""
    with open(path, "rb") as f:
        raw = f.read()
    h = np.frombuffer(raw[:1024], dtype=np.int32)
    if int(h[0]) != DEBUG_MAGIC or int(h[1]) != 1:
        fail(f"{path}: not a debug state (magic {int(h[0])} version {int(h[1])})")
    s = dict(zip(["B", "T", "V", "Vp", "C", "L", "E", "k", "Lm", "n_steps", "R", "router"], (int(x) for x in h[2:14])))
    s["P"] = int(h[14].view(np.uint32)) | (int(h[15].view(np.uint32)) << 32)
    N = s["B"] * s["T"]
    offset = 1024

    def take(dtype, count):
        nonlocal offset
        a = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
        offset += a.nbytes
        return a

    s["inputs"] = take(np.int32, N)
    s["targets"] = take(np.int32, N)
    s["logits"] = take(np.float32, N * s["V"])
    s["loss"], s["aux_loss"], s["z_loss"] = (float(x) for x in take(np.float32, 3))
    s["grads"] = take(np.float32, s["P"])
    s["routing"] = [(take(np.int32, s["R"]), take(np.float32, s["R"]), take(np.int32, s["R"])) for _ in range(s["Lm"])]
    s["losses"] = take(np.float32, s["n_steps"])
    s["params"] = take(np.float32, s["P"])
    if offset != len(raw):
        fail(f"{path}: {len(raw) - offset} trailing bytes after the debug state")
    return s


# ----------------------------------------------------------------------------
# routing decisions (doc/routing.md section 2): piecewise constant, computed on the host in numpy

def token_choice_capacity(cfg, N):
    """cap = ceil(cf * k * N / E) in double, None for dropless"""
    if cfg.cf <= 0:
        return None
    return int(math.ceil(cfg.cf * cfg.k * N / cfg.E))


def expert_choice_capacity(cfg, N):
    """cap = min(N, ceil(cf * N / E)), cf = k when no capacity factor is given; at least 1"""
    cf = cfg.cf if cfg.cf > 0 else float(cfg.k)
    return max(1, min(N, int(math.ceil(cf * N / cfg.E))))


def route_tokens(z, p, cfg):
    """z, p: (N, E) router logits and probabilities (numpy).
    Token choice: returns (chosen (N, k) experts ranked by z, ties to the lower expert; kept (N, k) bool).
    Expert choice: returns (tokens (E, cap): each expert's picks in token order, None)."""
    N, E = z.shape
    if cfg.router == 1:
        cap = expert_choice_capacity(cfg, N)
        tokens = np.empty((E, cap), dtype=np.int64)
        for e in range(E):
            best = np.argsort(-p[:, e], kind="stable")[:cap]  # largest p, ties to the lower token
            tokens[e] = np.sort(best)
        return tokens, None
    k = cfg.k
    chosen = np.argsort(-z, axis=1, kind="stable")[:, :k]
    kept = np.ones((N, k), dtype=bool)
    cap = token_choice_capacity(cfg, N)
    if cap is not None:
        filled = np.zeros(E, dtype=np.int64)
        for j in range(k):  # all first choices before any second choice
            experts = chosen[:, j]
            if cfg.priority == 1:  # within the slot by decreasing p of that choice, ties to the lower token
                order = np.argsort(-p[np.arange(N), experts], kind="stable")
            else:                  # within the slot in token order
                order = np.arange(N)
            ex = experts[order]
            # rank of each assignment among the earlier ones (in priority order) to the same expert
            by_expert = np.argsort(ex, kind="stable")
            counts = np.bincount(ex, minlength=E)
            starts = np.cumsum(counts) - counts
            rank = np.empty(N, dtype=np.int64)
            rank[by_expert] = np.arange(N) - np.repeat(starts, counts)
            admit = filled[ex] + rank < cap
            kept[order, j] = admit
            filled += np.bincount(ex[admit], minlength=E)
    return chosen, kept


# ----------------------------------------------------------------------------
# the MoE layer, differentiable through autograd (doc/routing.md)

def expert_mlp(x, fcw, fcb, fcprojw, fcprojb):
    """(rows, C) -> fc (H x C) + bias -> gelu -> fcproj (C x H) + bias -> (rows, C)"""
    return F.gelu(x @ fcw.t() + fcb, approximate="tanh") @ fcprojw.t() + fcprojb


def moe_forward(h, routerw, fcw, fcb, fcprojw, fcprojb, cfg):
    """One MoE layer over N tokens.
    h (N, C), routerw (E, C), fcw (E, H, C), fcb (E, H), fcprojw (E, C, H), fcprojb (E, C).
    Returns out (N, C), L_bal, L_z (scalars) and the routing rows (index, weight, kept) of the debug state."""
    N, C = h.shape
    E = routerw.shape[0]
    z = h @ routerw.t()                   # (N, E) router logits
    p = torch.softmax(z, dim=-1)          # (N, E)
    z_host = z.detach().cpu().numpy()
    p_host = p.detach().cpu().numpy()
    decision, kept = route_tokens(z_host, p_host, cfg)
    device = h.device
    if cfg.router == 0:
        chosen, k = decision, cfg.k
        chosen_t = torch.from_numpy(chosen).to(device)
        p_sel = p.gather(1, chosen_t)     # (N, k)
        # dropped choices stay in the renormalisation sum
        w = p_sel / p_sel.sum(dim=1, keepdim=True) if cfg.renorm == 1 else p_sel
        # each kept choice's weighted expert output at [t, j]; dropped ones stay 0
        contributions = h.new_zeros(N, k, C)
        for e in range(E):
            tok, slot = np.nonzero((chosen == e) & kept)  # rows of expert e, in token order
            if len(tok) == 0:
                continue
            tok_t, slot_t = torch.from_numpy(tok).to(device), torch.from_numpy(slot).to(device)
            y = expert_mlp(h[tok_t], fcw[e], fcb[e], fcprojw[e], fcprojb[e])
            contributions = contributions.index_put((tok_t, slot_t), y * w[tok_t, slot_t].unsqueeze(1))
        out = contributions[:, 0]
        for j in range(1, k):             # the sum in choice order
            out = out + contributions[:, j]
        f = np.bincount(chosen.ravel(), minlength=E) / float(N * k)  # share of the N*k assignments, before dropping
        rows = (chosen.ravel(), w.detach().cpu().numpy().ravel(), kept.ravel().astype(np.int32))
    else:
        tokens = decision                 # (E, cap)
        out = h.new_zeros(N, C)
        weights = []
        for e in range(E):                # a token sums its experts in expert order
            tok_t = torch.from_numpy(tokens[e]).to(device)
            w = p[tok_t, e]
            y = expert_mlp(h[tok_t], fcw[e], fcb[e], fcprojw[e], fcprojb[e])
            out = out.index_add(0, tok_t, y * w.unsqueeze(1))
            weights.append(w.detach().cpu().numpy())
        f = np.full(E, 1.0 / E)
        rows = (tokens.ravel(), np.concatenate(weights), np.ones(tokens.size, dtype=np.int32))
    f_t = torch.from_numpy(f).to(device=device, dtype=p.dtype)  # a count: no gradient
    balance = E * torch.sum(f_t * p.mean(dim=0))
    z_loss = torch.mean(torch.logsumexp(z, dim=-1) ** 2)
    return out, balance, z_loss, rows


# ----------------------------------------------------------------------------
# GPT-2 (llm.c's layout) with MoE layers

class Model:
    def __init__(self, cfg, params, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.params = [torch.tensor(np.asarray(p), dtype=dtype, device=self.device).requires_grad_(True)
                       for p in params]

    def parameters_numpy(self):
        return [p.detach().cpu().numpy().astype(np.float32) for p in self.params]

    def forward(self, inputs, targets=None):
        """inputs, targets: (B, T) int64 tensors. Returns logits (B, T, Vp), the mean cross-entropy over
        the first V columns (or None), the aux and z losses summed over MoE layers, the routing rows."""
        cfg = self.cfg
        (wte, wpe, ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb, lnfw, lnfb,
         routerw, efcw, efcb, efcprojw, efcprojb) = self.params
        B, T = inputs.shape
        C, NH = cfg.C, cfg.NH
        hs = C // NH
        N = B * T
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=self.device))
        x = wte[inputs] + wpe[:T]                                   # (B, T, C)
        aux = x.new_zeros(())
        zl = x.new_zeros(())
        routing = []
        for l in range(cfg.L):
            h = F.layer_norm(x, (C,), ln1w[l], ln1b[l], eps=1e-5)
            qkv = h @ qkvw[l].t() + qkvb[l]                        # (B, T, 3C)
            q, k, v = qkv.split(C, dim=2)
            q = q.view(B, T, NH, hs).transpose(1, 2)               # (B, NH, T, hs)
            k = k.view(B, T, NH, hs).transpose(1, 2)
            v = v.view(B, T, NH, hs).transpose(1, 2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, NH, T, T)
            att = att.masked_fill(~causal, float("-inf"))
            att = torch.softmax(att, dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
            x = x + y @ attprojw[l].t() + attprojb[l]
            h = F.layer_norm(x, (C,), ln2w[l], ln2b[l], eps=1e-5)
            if cfg.moe[l]:
                m = cfg.moe_slot(l)
                out, balance, z_loss, rows = moe_forward(h.reshape(N, C), routerw[m], efcw[m], efcb[m], efcprojw[m],
                                                         efcprojb[m], cfg)
                x = x + out.view(B, T, C)
                aux = aux + balance
                zl = zl + z_loss
                routing.append(rows)
            else:
                d = cfg.dense_slot(l)
                x = x + expert_mlp(h, fcw[d], fcb[d], fcprojw[d], fcprojb[d])
        x = F.layer_norm(x, (C,), lnfw, lnfb, eps=1e-5)
        logits = x @ wte.t()                                        # (B, T, Vp)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits[:, :, :cfg.V].reshape(N, cfg.V), targets.reshape(N))
        return logits, loss, aux, zl, routing


def learning_rate(step, max_steps, a):
    """the schedule of the brief, in double"""
    lr_max, warmup = a.lr, a.warmup
    if warmup > 0 and step < warmup:
        return lr_max * (step + 1) / warmup
    min_lr = lr_max * a.final_lr_frac
    if a.lr_schedule == "cosine":
        ratio = (step - warmup) / (max_steps - warmup) if max_steps > warmup else 0.0
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr_max - min_lr)
    if a.lr_schedule == "wsd":
        d = int(a.decay_frac * max_steps)
        if d > 0 and step >= max_steps - d:
            return lr_max + (step - (max_steps - d) + 1) / d * (min_lr - lr_max)
    return lr_max


def make_optimizer(model, a):
    """AdamW, weight decay on the 2-D weights only"""
    decay = [t for p, t in enumerate(model.params) if p in DECAYED and t.numel() > 0]
    no_decay = [t for p, t in enumerate(model.params) if p not in DECAYED and t.numel() > 0]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {}
    if "foreach" in torch.optim.AdamW.__init__.__code__.co_varnames:
        kwargs["foreach"] = False  # the plain per-tensor loop: the formula as written
    return torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, **kwargs)


def train_step(model, optimizer, inputs, targets, lr, a):
    """forward, backward of CE + alpha*aux + beta*z, clip, AdamW. Returns the forward's outputs."""
    logits, loss, aux, zl, routing = model.forward(inputs, targets)
    total = loss + a.aux_loss * aux + a.z_loss * zl
    optimizer.zero_grad(set_to_none=False)
    total.backward()
    grads = [t.grad.detach().cpu().numpy().astype(np.float32).ravel() if t.grad is not None
             else np.zeros(t.numel(), dtype=np.float32) for t in model.params]
    if a.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([t for t in model.params if t.numel() > 0], a.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return logits, loss, aux, zl, routing, grads


# ----------------------------------------------------------------------------
# from the command line to the model

class UpcycleOptions:
    def __init__(self, a):
        self.init = a.init
        self.drop_ratio = a.drop_ratio
        self.drop_mode = a.drop_mode
        self.noise_std = a.noise_std
        self.router_std = a.router_std
        self.weight_scaling = a.weight_scaling
        self.seed = a.seed


SHAPES = {"d12": (12, 768, 12, 1024), "d24": (24, 1024, 16, 1024), "d36": (36, 1280, 20, 1024),
          "d48": (48, 1600, 25, 1024)}


def parse_shape(spec, V):
    if spec in SHAPES:
        L, C, NH, maxT = SHAPES[spec]
    else:
        m = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", spec)
        if not m:
            return None
        L, C, NH, maxT = (int(x) for x in m.groups())
    if V is None:
        fail(f"-m {spec} builds a fresh model: give its vocabulary with --vocab")
    cfg = Config(maxT, V, (V + 127) // 128 * 128, L, NH, C)
    validate_dimensions(cfg, f"--model {spec}")
    return cfg


def apply_routing_args(cfg, a, only_given):
    """the routing options of the command line (given ones only, or with their defaults)"""
    defaults = {"topk": 2, "renorm": 1, "router": "topk", "capacity_factor": 0.0, "capacity_priority": "order"}
    value = {}
    for name, default in defaults.items():
        given = getattr(a, name)
        value[name] = given if given is not None else (None if only_given else default)
    if value["topk"] is not None:
        cfg.k = value["topk"]
    if value["renorm"] is not None:
        cfg.renorm = value["renorm"]
    if value["router"] is not None:
        cfg.router = ROUTERS.index(value["router"])
    if value["capacity_factor"] is not None:
        cfg.cf = float(np.float32(value["capacity_factor"]))  # stored as fp32, in the header and the engines
    if value["capacity_priority"] is not None:
        cfg.priority = PRIORITIES.index(value["capacity_priority"])


def moe_config(dense_cfg, a):
    """the MoE layout of the command line on top of dense dimensions"""
    cfg = Config(dense_cfg.maxT, dense_cfg.V, dense_cfg.Vp, dense_cfg.L, dense_cfg.NH, dense_cfg.C)
    cfg.E = a.experts if a.experts is not None else 1
    cfg.G = a.granularity if a.granularity is not None else 1
    cfg.init = INITS.index(a.init)
    apply_routing_args(cfg, a, only_given=False)
    cfg.moe = select_moe_layers(a.moe_layers if a.moe_layers is not None else "every2", cfg.L)
    validate_moe(cfg, "command line")
    return cfg


def check_option_ranges(a):
    if a.experts is not None and a.experts < 1:
        fail(f"-e {a.experts}: expected at least 1 expert")
    if a.granularity is not None and a.granularity < 1:
        fail(f"--granularity {a.granularity}: expected at least 1")
    if a.topk is not None and a.topk < 1:
        fail(f"-k {a.topk}: expected at least 1")
    if not 0.0 <= a.drop_ratio <= 1.0:
        fail(f"--drop-ratio {a.drop_ratio}: expected a fraction in [0, 1]")
    if a.noise_std < 0 or a.router_std < 0:
        fail("--noise-std and --router-std must be >= 0")
    if not math.isfinite(a.capacity_factor if a.capacity_factor is not None else 0.0):
        fail("--capacity-factor must be a finite number")


def build_model(a):
    """-m (checkpoint or shape) and the options -> (Config, list of 21 fp32 numpy tensors)"""
    check_option_ranges(a)
    spec = a.model
    if not os.path.exists(spec):
        shape_cfg = parse_shape(spec, getattr(a, "vocab", None))
        if shape_cfg is None:
            fail(f"model file {spec} not found: give a checkpoint with -m FILE, or a shape such as -m d12 or "
                 "-m 4:128:4:256 (with --vocab) to start from scratch")
        if a.experts is not None and a.experts > 1:
            if a.init != "scratch" and a.init_given:
                fail(f"--init {a.init} needs a dense checkpoint to upcycle, but -m {spec} is a shape")
            cfg = moe_config(shape_cfg, a)
            cfg.init = INITS.index("scratch")
        else:
            cfg = shape_cfg
        return cfg, init_scratch(cfg, a.seed, a.router_std)
    cfg, params = read_checkpoint(spec)
    if cfg.E > 1:  # an MoE checkpoint: structure fixed, routing defaults may be overridden
        if a.experts is not None and a.experts != cfg.E:
            fail(f"{spec} holds E={cfg.E} experts per layer; -e {a.experts} conflicts")
        if a.granularity is not None and a.granularity != cfg.G:
            fail(f"{spec} has granularity {cfg.G}; --granularity {a.granularity} conflicts")
        if a.moe_layers is not None and select_moe_layers(a.moe_layers, cfg.L) != cfg.moe:
            fail(f"{spec} has MoE layers {cfg.moe_layer_list()}; --moe-layers {a.moe_layers} conflicts")
        apply_routing_args(cfg, a, only_given=True)
        validate_moe(cfg, spec)
        return cfg, params
    if a.experts is None or a.experts == 1:
        return cfg, params
    mcfg = moe_config(cfg, a)
    return mcfg, upcycle(cfg, params, mcfg, UpcycleOptions(a))


def describe(cfg):
    s = (f"L={cfg.L} C={cfg.C} NH={cfg.NH} V={cfg.V} Vp={cfg.Vp} maxT={cfg.maxT}, "
         f"{count_parameters(cfg)} parameters")
    if cfg.E > 1:
        s += (f" | E={cfg.E} k={cfg.k} G={cfg.G} H={cfg.H} MoE layers {cfg.moe_layer_list()} | router "
              f"{ROUTERS[cfg.router]} renorm {cfg.renorm} capacity factor {cfg.cf:g} priority "
              f"{PRIORITIES[cfg.priority]} init {INITS[cfg.init]}")
    return s


def setup_torch(a):
    if a.device == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if hasattr(torch, "set_float32_matmul_precision"):
            torch.set_float32_matmul_precision("highest")
    return torch.float64 if a.dtype == "float64" else torch.float32


def window(tokens, start, B, T, device):
    buf = torch.from_numpy(np.ascontiguousarray(tokens[start:start + B * T + 1])).to(device)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


# ----------------------------------------------------------------------------
# subcommands

def cmd_make_dense(a):
    cfg = parse_shape(a.model, a.vocab)
    if cfg is None:
        fail(f"--model {a.model}: expected L:C:NH:maxT or d12/d24/d36/d48")
    params = init_scratch(cfg, a.seed, 0.02)
    if a.jitter > 0:  # non-trivial biases and layer norms for the tests, in parameter order
        rng = np.random.default_rng(a.seed)
        for p in range(16):
            if p in BIASES or p in LAYERNORM_WEIGHTS:
                params[p] = (params[p].astype(np.float64) + rng.normal(0.0, a.jitter, params[p].shape)).astype(np.float32)
    write_dense_checkpoint(a.output, cfg, params)
    print(f"wrote {a.output}: dense GPT-2, {describe(cfg)}")


def cmd_make_shard(a):
    if not 1 <= a.vocab <= 65536:
        fail(f"--vocab {a.vocab}: shard tokens are uint16, expected 1..65536")
    if a.tokens < 1:
        fail(f"--tokens {a.tokens}: expected at least 1")
    tokens = np.random.default_rng(a.seed).integers(0, a.vocab, size=a.tokens)
    write_shard(a.output, tokens)
    print(f"wrote {a.output}: {a.tokens} uniform random tokens in [0, {a.vocab})")


def cmd_upcycle(a):
    if not os.path.isfile(a.model):
        fail(f"{a.model}: no such file")
    cfg, _ = read_checkpoint(a.model)
    if cfg.E > 1:
        fail(f"{a.model} is already an MoE checkpoint: upcycle reads a dense one")
    if a.experts is None or a.experts < 2:
        fail("upcycle: give the number of experts with -e (2 or more)")
    cfg, params = build_model(a)
    write_moe_checkpoint(a.write_model, cfg, params)
    print(f"wrote {a.write_model}: {describe(cfg)}")


def cmd_debug(a):
    dtype = setup_torch(a)
    cfg, params = build_model(a)
    if a.write_model:
        write_checkpoint(a.write_model, cfg, params)
    B, T, steps = a.batch_size, a.seq_len, a.steps
    if B < 1 or T < 1 or steps < 1:
        fail(f"-b {B} -t {T} --steps {steps}: all must be at least 1")
    if T > cfg.maxT:
        fail(f"-t {T}: the model has only maxT={cfg.maxT} positions")
    tokens = read_shard(a.input, cfg.V)
    need = steps * B * T + 1
    if len(tokens) < need:
        fail(f"{a.input}: {len(tokens)} tokens, but {steps} steps of B*T={B * T} need {need}")
    if cfg.E > 1 and cfg.router == 1:
        print("warning: expert choice lets a token's experts depend on later tokens of the batch", file=sys.stderr)
    model = Model(cfg, params, a.device, dtype)
    optimizer = make_optimizer(model, a)
    N, V = B * T, cfg.V
    losses = []
    for s in range(steps):
        inputs, targets = window(tokens, s * N, B, T, model.device)
        lr = learning_rate(s, steps, a)
        logits, loss, aux, zl, routing, grads = train_step(model, optimizer, inputs, targets, lr, a)
        losses.append(loss.item())
        if s == 0:
            first = dict(inputs=inputs.cpu().numpy().ravel(), targets=targets.cpu().numpy().ravel(),
                         logits=logits.detach()[:, :, :V].cpu().numpy().astype(np.float32).ravel(),
                         losses3=[loss.item(), aux.item(), zl.item()], grads=np.concatenate(grads), routing=routing)
        print(f"step {s + 1}/{steps} | loss {losses[-1]:.6f} | aux {aux.item():.6f} | z {zl.item():.6f} | lr {lr:.4e}")
    R = len(first["routing"][0][0]) if first["routing"] else 0
    write_debug_state(a.state, cfg, B, T, R, first["inputs"], first["targets"], first["logits"], first["losses3"],
                      first["grads"], first["routing"], losses, flatten_parameters(model.parameters_numpy()))
    print(f"wrote {a.state}: {describe(cfg)} | B={B} T={T} {steps} steps")


def cmd_bench(a):
    dtype = setup_torch(a)
    cfg, params = build_model(a)
    B, T, steps = a.batch_size, a.seq_len, a.steps
    if steps < 3:
        fail(f"--steps {steps}: the first 2 steps are warm-up, give at least 3")
    if T > cfg.maxT:
        fail(f"-t {T}: the model has only maxT={cfg.maxT} positions")
    tokens = read_shard(a.input, cfg.V)
    N = B * T
    if len(tokens) < N + 1:
        fail(f"{a.input}: {len(tokens)} tokens, one window of B*T+1 = {N + 1} needs more")
    model = Model(cfg, params, a.device, dtype)
    optimizer = make_optimizer(model, a)
    times = []
    pos = 0
    for s in range(steps):
        if pos + N + 1 > len(tokens):
            pos = 0
        inputs, targets = window(tokens, pos, B, T, model.device)
        pos += N
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, optimizer, inputs, targets, learning_rate(s, steps, a), a)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times[2:])) * 1e3
    print(f"model: {describe(cfg)}")
    print(f"bench: torch {torch.__version__} on {a.device} ({a.dtype}), {torch.get_num_threads()} threads | "
          f"B={B} T={T} | {steps - 2} timed steps | median {ms:.2f} ms/step | {N / (ms / 1e3):.0f} tokens/s")


# ----------------------------------------------------------------------------
# command line

def add_model_options(p):
    g = p.add_argument_group("model and MoE")
    g.add_argument("-m", "--model", required=True, help="checkpoint (dense or MoE), or a shape d12 / L:C:NH:maxT")
    g.add_argument("--vocab", type=int, default=50257, help="V, for a model given as a shape (default 50257, GPT-2's, as the engines)")
    g.add_argument("-e", "--experts", type=int, default=None, help="experts per MoE layer, 1 = dense (default 1)")
    g.add_argument("-k", "--topk", type=int, default=None, help="experts per token (default 2, or the checkpoint's)")
    g.add_argument("--granularity", type=int, default=None, help="G: each expert holds 4C/G units (default 1)")
    g.add_argument("--moe-layers", default=None, help="every2 | all | lastN | 1,3,5 (default every2)")
    g.add_argument("--init", choices=INITS, default=None, help="expert initialisation (default copy)")
    g.add_argument("--drop-ratio", type=float, default=0.5)
    g.add_argument("--drop-mode", choices=["shared", "independent"], default="shared")
    g.add_argument("--noise-std", type=float, default=0.02)
    g.add_argument("--router-std", type=float, default=0.02)
    g.add_argument("--weight-scaling", type=int, choices=[0, 1], default=1)
    g.add_argument("--renorm", type=int, choices=[0, 1], default=None, help="default 1, or the checkpoint's")
    g.add_argument("--router", choices=ROUTERS, default=None, help="default topk, or the checkpoint's")
    g.add_argument("--capacity-factor", type=float, default=None, help="0 = dropless (default), or the checkpoint's")
    g.add_argument("--capacity-priority", choices=PRIORITIES, default=None, help="default order, or the checkpoint's")
    g.add_argument("--aux-loss", type=float, default=0.01)
    g.add_argument("--z-loss", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=1337)
    o = p.add_argument_group("optimizer")
    o.add_argument("-l", "--lr", type=float, default=3e-4)
    o.add_argument("-u", "--warmup", type=int, default=0)
    o.add_argument("-q", "--final-lr-frac", type=float, default=0.1)
    o.add_argument("--lr-schedule", choices=["cosine", "constant", "wsd"], default="cosine")
    o.add_argument("--decay-frac", type=float, default=0.2)
    o.add_argument("-c", "--weight-decay", type=float, default=0.0)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--eps", type=float, default=1e-8)
    o.add_argument("--grad-clip", type=float, default=1.0)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def make_parser():
    parser = argparse.ArgumentParser(description="PyTorch reference of the MoE engine (GPT-2, upcycled)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-dense", help="a fresh dense GPT-2 checkpoint (llm.c v3)")
    p.add_argument("--model", required=True, help="L:C:NH:maxT or d12/d24/d36/d48")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--jitter", type=float, default=0.0, help="std of N(0, J^2) added to biases and layer norms")
    p.add_argument("-o", "--output", required=True)
    p = sub.add_parser("make-shard", help="a shard of uniform random tokens")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("-o", "--output", required=True)
    for name, help_ in (("debug", "write the debug state the engines are tested against"),
                        ("bench", "time training steps"), ("upcycle", "upcycle a dense checkpoint and write it")):
        p = sub.add_parser(name, help=help_)
        add_model_options(p)
        if name != "upcycle":
            p.add_argument("-i", "--input", required=True, help="token shard")
            p.add_argument("-b", "--batch-size", type=int, required=True)
            p.add_argument("-t", "--seq-len", type=int, required=True)
            p.add_argument("--steps", type=int, required=True)
        if name == "debug":
            p.add_argument("--state", required=True, help="the debug state to write")
        if name in ("debug", "upcycle"):
            p.add_argument("--write-model", required=(name == "upcycle"), default=None,
                           help="write the initial (upcycled) model")
    return parser


def parse_args(argv):
    a = make_parser().parse_args(argv)
    if hasattr(a, "init"):
        a.init_given = a.init is not None
        if a.init is None:
            a.init = "copy"
    return a


def main(argv=None):
    a = parse_args(argv)
    commands = {"make-dense": cmd_make_dense, "make-shard": cmd_make_shard, "debug": cmd_debug, "bench": cmd_bench,
                "upcycle": cmd_upcycle}
    try:
        commands[a.command](a)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
