#!/usr/bin/env python3
"""
Checks of the PyTorch reference (dev/train_moe.py) against exact invariants and direct formulas.

    /usr/bin/python3 tests/test_reference.py

Prints "PASS name: detail" or "FAIL name: detail" per check and exits with status 1 when any
check fails. Runs in well under a minute on the CPU; temporary files go under /tmp.
"""
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dev", "train_moe.py")
_spec = importlib.util.spec_from_file_location("train_moe", SCRIPT)
tm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tm)

results = {"pass": 0, "fail": 0}


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    results["pass" if ok else "fail"] += 1


def run_check(fn):
    """one check function; an exception is a failure of that check"""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - report and go on with the other checks
        check(fn.__name__, False, f"raised {type(err).__name__}: {err}\n{traceback.format_exc()}")


def args_for(dense_path, *options):
    return tm.parse_args(["debug", "-m", dense_path, "-i", "unused", "-b", "4", "-t", "16", "--steps", "1",
                          "--state", "unused", *options])


def expect_error(fn, contains):
    try:
        fn()
    except tm.InputError as err:
        return contains in str(err), str(err)
    return False, "no error raised"


# ----------------------------------------------------------------------------
# fixtures: a tiny dense model and a shard

TMP = tempfile.mkdtemp(prefix="test_reference_", dir="/tmp")
DENSE = os.path.join(TMP, "dense.bin")
SHARD = os.path.join(TMP, "shard.bin")
tm.main(["make-dense", "--model", "4:32:4:16", "--vocab", "100", "--jitter", "0.05", "-o", DENSE])
tm.main(["make-shard", "--vocab", "100", "--tokens", "1000", "-o", SHARD])
TOKENS = tm.read_shard(SHARD, 100)
B, T = 4, 16
INPUTS = torch.from_numpy(TOKENS[:B * T].copy()).view(B, T)
TARGETS = torch.from_numpy(TOKENS[1:B * T + 1].copy()).view(B, T)


def build(*options, dtype=torch.float32):
    cfg, params = tm.build_model(args_for(DENSE, *options))
    return cfg, params, tm.Model(cfg, params, "cpu", dtype)


# ----------------------------------------------------------------------------
# 1. copy upcycling keeps the dense function (renorm 1, dropless), and renorm 0 does not

def upcycled_copy_matches_dense_logits():
    _, _, dense = build("-e", "1")
    ref, _, _, _, _ = dense.forward(INPUTS)
    scale = ref.abs().max().item()
    for layers in ("every2", "all"):
        cfg, _, moe = build("-e", "8", "-k", "2", "--moe-layers", layers, "--router-std", "0.5")
        logits, _, _, _, routing = moe.forward(INPUTS)
        err = (logits - ref).abs().max().item() / scale
        check(f"upcycled_copy_matches_dense_logits[{layers}]", err < 1e-5,
              f"max |diff| / max |logit| = {err:.2e} (tolerance 1e-5), {cfg.Lm} MoE layers")
    _, _, moe = build("-e", "8", "-k", "2", "--moe-layers", "all", "--renorm", "0")
    logits, _, _, _, _ = moe.forward(INPUTS)
    err = (logits - ref).abs().max().item() / scale
    check("upcycled_copy_renorm0_changes_logits", err > 1e-3, f"max |diff| / max |logit| = {err:.2e} (expected > 1e-3)")


# ----------------------------------------------------------------------------
# 2. upcycling recipes: drop, noise, granularity, and the random numbers themselves

def mix64_scalar(x):
    M = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def normal_scalar(seed, stream, i):
    def u64(c):
        return mix64_scalar(mix64_scalar(seed ^ mix64_scalar(stream)) ^ c)
    u1 = 1.0 - (u64(2 * i) >> 11) * 2.0 ** -53
    u2 = (u64(2 * i + 1) >> 11) * 2.0 ** -53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def rng_matches_scalar_formula():
    seed, stream = 1337, tm.rng_stream(3, 5, 7, 2)
    idx = np.array([0, 1, 2, 1000, 123456789, 2 ** 40 + 3], dtype=np.uint64)
    vec_u = tm.random_u64(seed, stream, idx)
    ok_u = all(int(v) == mix64_scalar(mix64_scalar(seed ^ mix64_scalar(stream)) ^ int(i)) for v, i in zip(vec_u, idx))
    vec_n = tm.random_normal(seed, stream, idx)
    err = max(abs(float(v) - normal_scalar(seed, stream, int(i))) for v, i in zip(vec_n, idx))
    check("rng_matches_scalar_formula", ok_u and err < 1e-15,
          f"random_u64 {'equal' if ok_u else 'DIFFER'}, normal max |diff| {err:.1e}")
    s = tm.rng_stream(6, 0, 0, 20)
    check("rng_stream_layout", s == (6 << 56) | 20 and tm.rng_stream(1, 3, 2, 0) == (1 << 56) | (3 << 40) | (2 << 24),
          f"stream(6,0,0,20) = {s:#x}")


def changed_units(expert, dense_fcw, dense_fcb, dense_fcprojw):
    fcw, fcb, fcprojw = expert
    rows = np.nonzero(np.any(fcw != dense_fcw, axis=1))[0]
    entries = np.nonzero(fcb != dense_fcb)[0]
    cols = np.nonzero(np.any(fcprojw != dense_fcprojw, axis=0))[0]
    return rows, entries, cols


def drop_upcycling_redraws_floor_rH_units():
    dcfg, dense = tm.read_checkpoint(DENSE)
    for mode in ("shared", "independent"):
        cfg, params = tm.build_model(args_for(DENSE, "-e", "8", "-k", "2", "--moe-layers", "all", "--init", "drop",
                                              "--drop-ratio", "0.5", "--drop-mode", mode))
        H, m = cfg.H, int(math.floor(0.5 * cfg.H))
        counts_ok, same_sets, expert_sets, n_experts = True, 0, set(), 0
        stats_detail, stats_ok = [], True
        for l in range(cfg.L):
            ms = cfg.moe_slot(l)
            redrawn = [[], [], []]
            for e in range(cfg.E):
                expert = (params[tm.P_EXPERT_FCW][ms, e], params[tm.P_EXPERT_FCB][ms, e],
                          params[tm.P_EXPERT_FCPROJW][ms, e])
                rows, entries, cols = changed_units(expert, dense[tm.P_FCW][l], dense[tm.P_FCB][l],
                                                    dense[tm.P_FCPROJW][l])
                counts_ok &= len(rows) == m and len(entries) == m and len(cols) == m
                same_sets += int(np.array_equal(rows, entries) and np.array_equal(rows, cols))
                expert_sets.add(tuple(rows))
                n_experts += 1
                redrawn[0].append(expert[0][rows].ravel())
                redrawn[1].append(expert[1][entries])
                redrawn[2].append(expert[2][:, cols].ravel())
                if not np.array_equal(params[tm.P_EXPERT_FCPROJB][ms, e], dense[tm.P_FCPROJB][l]):
                    counts_ok = False
            if mode == "shared":
                for t, d in enumerate((dense[tm.P_FCW][l], dense[tm.P_FCB][l], dense[tm.P_FCPROJW][l])):
                    x = np.concatenate(redrawn[t]).astype(np.float64)
                    mean, std = d.astype(np.float64).mean(), d.astype(np.float64).std(ddof=1)
                    mean_err = abs(x.mean() - mean) / (std / math.sqrt(x.size))  # in standard errors
                    std_err = abs(x.std(ddof=1) / std - 1.0)
                    tol = 5.0 / math.sqrt(2.0 * x.size)
                    stats_ok &= mean_err < 5.0 and std_err < tol
                    stats_detail.append(f"{mean_err:.1f}se/{std_err:.3f}")
        check(f"drop_upcycling_redraws_floor_rH_units[{mode}]", counts_ok,
              f"every expert: {m} of H={H} fcw rows, fcb entries and fcprojw columns re-drawn, fcprojb copied")
        if mode == "shared":
            check("drop_shared_mode_one_unit_set_per_expert", same_sets == n_experts,
                  f"{same_sets}/{n_experts} experts use one set for fcw rows, fcb entries and fcprojw columns")
            check("drop_unit_sets_differ_between_experts", len(expert_sets) == n_experts,
                  f"{len(expert_sets)} distinct sets for {n_experts} experts")
            check("drop_values_follow_dense_statistics", stats_ok,
                  "mean error (standard errors) / relative std error per layer and tensor: " + " ".join(stats_detail))
        else:
            check("drop_independent_mode_sets_differ_per_tensor", same_sets < n_experts,
                  f"{n_experts - same_sets}/{n_experts} experts have different sets for the three tensors")


def drop_draws_follow_the_counter_rng():
    """unit set, re-drawn values and router row of one expert, from the scalar formulas of doc/upcycling.md"""
    dcfg, dense = tm.read_checkpoint(DENSE)
    cfg, params = tm.build_model(args_for(DENSE, "-e", "8", "-k", "2", "--init", "drop", "--seed", "42"))
    l, e, seed, C, H = 3, 5, 42, cfg.C, cfg.H
    ms, m = cfg.moe_slot(l), H // 2
    keys = sorted((mix64_scalar(mix64_scalar(seed ^ mix64_scalar(tm.rng_stream(2, l, e, 0))) ^ u), u) for u in range(H))
    units = sorted(u for _, u in keys[:m])
    fcw = params[tm.P_EXPERT_FCW][ms, e]
    rows, _, _ = changed_units((fcw, params[tm.P_EXPERT_FCB][ms, e], params[tm.P_EXPERT_FCPROJW][ms, e]),
                               dense[tm.P_FCW][l], dense[tm.P_FCB][l], dense[tm.P_FCPROJW][l])
    d = dense[tm.P_FCW][l].astype(np.float64)
    mean, std = d.mean(), d.std(ddof=1)
    u, j = units[7], 11
    value = np.float32(mean + std * normal_scalar(seed, tm.rng_stream(3, l, e, 0), u * C + j))
    router = np.float32(0.02 * normal_scalar(seed, tm.rng_stream(1, l, e, 0), j))
    ok = list(rows) == units and fcw[u, j] == value and params[tm.P_ROUTERW][ms, e, j] == router
    check("drop_draws_follow_the_counter_rng", ok,
          f"S_e = the {m} smallest keys: {list(rows) == units}; fcw[{u}][{j}] {fcw[u, j]!r} vs {value!r}; "
          f"routerw[{e}][{j}] {params[tm.P_ROUTERW][ms, e, j]!r} vs {router!r}")


def noise_upcycling_perturbs_floor_rH_units():
    dcfg, dense = tm.read_checkpoint(DENSE)
    cfg, params = tm.build_model(args_for(DENSE, "-e", "4", "-k", "2", "--init", "noise", "--drop-ratio", "0.25",
                                          "--noise-std", "0.02"))
    m = int(math.floor(0.25 * cfg.H))
    ok, deltas = True, []
    for l in cfg.moe_layer_list():
        ms = cfg.moe_slot(l)
        for e in range(cfg.E):
            fcw = params[tm.P_EXPERT_FCW][ms, e]
            rows, _, _ = changed_units((fcw, params[tm.P_EXPERT_FCB][ms, e], params[tm.P_EXPERT_FCPROJW][ms, e]),
                                       dense[tm.P_FCW][l], dense[tm.P_FCB][l], dense[tm.P_FCPROJW][l])
            ok &= len(rows) == m
            deltas.append((fcw[rows].astype(np.float64) - dense[tm.P_FCW][l][rows]).ravel())
    d = np.concatenate(deltas)
    std_ok = abs(d.std() / 0.02 - 1) < 0.05 and abs(d.mean()) < 5 * 0.02 / math.sqrt(d.size)
    check("noise_upcycling_perturbs_floor_rH_units", ok and std_ok,
          f"{m} rows per expert perturbed: {ok}; noise mean {d.mean():.2e} std {d.std():.4f} (expected 0.02)")


def granularity_shards_scaling_and_virtual_groups():
    dcfg, dense = tm.read_checkpoint(DENSE)
    # G = 2, renorm 0: s = E*G/k = 4, so fcw and fcprojw are twice the dense shard (exact in fp32)
    cfg, params = tm.build_model(args_for(DENSE, "-e", "4", "-k", "2", "--granularity", "2", "--renorm", "0"))
    H, ok = cfg.H, True
    for l in cfg.moe_layer_list():
        ms = cfg.moe_slot(l)
        for e in range(cfg.E):
            g = e % 2
            ok &= np.array_equal(params[tm.P_EXPERT_FCW][ms, e], 2 * dense[tm.P_FCW][l, g * H:(g + 1) * H])
            ok &= np.array_equal(params[tm.P_EXPERT_FCB][ms, e], dense[tm.P_FCB][l, g * H:(g + 1) * H])
            ok &= np.array_equal(params[tm.P_EXPERT_FCPROJW][ms, e], 2 * dense[tm.P_FCPROJW][l, :, g * H:(g + 1) * H])
        r = params[tm.P_ROUTERW][ms]
        ok &= np.array_equal(r[0], r[1]) and np.array_equal(r[2], r[3]) and not np.array_equal(r[0], r[2])
    check("granularity_shards_scaling_and_virtual_groups", ok and H == 64,
          "expert e = shard e mod G scaled by sqrt(E*G/k) = 2, router rows shared within each copy")


# ----------------------------------------------------------------------------
# 3. auxiliary losses

def moe_inputs(N, C, E, H, seed, dtype=torch.float64, router_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=dtype)
    routerw = torch.randn(E, C, generator=g, dtype=dtype) * router_scale
    fcw = torch.randn(E, H, C, generator=g, dtype=dtype) * 0.5
    fcb = torch.randn(E, H, generator=g, dtype=dtype) * 0.1
    fcprojw = torch.randn(E, C, H, generator=g, dtype=dtype) * 0.5
    fcprojb = torch.randn(E, C, generator=g, dtype=dtype) * 0.1
    return [h, routerw, fcw, fcb, fcprojw, fcprojb]


def routing_cfg(E, k, renorm=1, router=0, cf=0.0, priority=0):
    cfg = tm.Config(16, 100, 128, 1, 1, 8)
    cfg.E, cfg.k, cfg.renorm, cfg.router, cfg.cf, cfg.priority = E, k, renorm, router, cf, priority
    return cfg


def aux_losses_match_formulas():
    E, k, N, C, H = 8, 2, 40, 6, 5
    inp = moe_inputs(N, C, E, H, seed=1)
    inp[1] = torch.zeros(E, C, dtype=torch.float64)  # z = 0: uniform p, every logit tied
    _, balance, z_loss, rows = tm.moe_forward(*inp, routing_cfg(E, k))
    tie_rule = np.array_equal(rows[0].reshape(N, k), np.tile([0, 1], (N, 1)))
    check("aux_loss_of_uniform_routing_is_one", abs(balance.item() - 1.0) < 1e-12 and tie_rule,
          f"L_bal = {balance.item():.15f}, tied logits go to experts 0, 1: {tie_rule}")
    check("z_loss_of_zero_logits_is_log_E_squared", abs(z_loss.item() - math.log(E) ** 2) < 1e-12,
          f"L_z = {z_loss.item():.12f}, (ln E)^2 = {math.log(E) ** 2:.12f}")

    inp = moe_inputs(N, C, E, H, seed=2)
    routerw = inp[1].clone().requires_grad_(True)
    _, balance, z_loss, rows = tm.moe_forward(inp[0], routerw, *inp[2:], routing_cfg(E, k))
    z = (inp[0] @ inp[1].t()).numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    chosen = np.argsort(-z, axis=1, kind="stable")[:, :k]
    f = np.array([(chosen == e).sum() for e in range(E)]) / (N * k)
    bal_np = E * np.sum(f * p.mean(0))
    lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
    zl_np = np.mean(lse ** 2)
    check("aux_losses_match_numpy", abs(balance.item() - bal_np) < 1e-12 and abs(z_loss.item() - zl_np) < 1e-12,
          f"L_bal {balance.item():.12f} vs {bal_np:.12f}, L_z {z_loss.item():.12f} vs {zl_np:.12f}")
    # f counts the assignments before dropping: capacity leaves L_bal as it is
    _, balance_cap, _, rows_cap = tm.moe_forward(*inp, routing_cfg(E, k, cf=0.5))
    dropped = int((rows_cap[2] == 0).sum())
    check("aux_loss_counts_assignments_before_dropping", abs(balance_cap.item() - bal_np) < 1e-12 and dropped > 0,
          f"L_bal with capacity factor 0.5 ({dropped} dropped) {balance_cap.item():.12f} vs {bal_np:.12f}")
    # gradient of L_bal: dL/dp = E f / N (f carries none), through the softmax, dWr = dz^T h
    grad, = torch.autograd.grad(balance, routerw)
    dp = np.tile(E * f / N, (N, 1))
    dz = p * (dp - np.sum(p * dp, axis=1, keepdims=True))
    err = np.abs(grad.numpy() - dz.T @ inp[0].numpy()).max()
    check("aux_loss_gradient_matches_formula", err < 1e-12, f"max |dWr - dz^T h| = {err:.1e}")


# ----------------------------------------------------------------------------
# 4. gradients of the routing through autograd, by finite differences (gradcheck, float64)

def routing_margin(z, p, cfg):
    """smallest gap between scores whose order decides the routing (a perturbation below it flips nothing)"""
    N, E = z.shape
    if cfg.router == 1:
        cap = tm.expert_choice_capacity(cfg, N)
        s = -np.sort(-p, axis=0)
        return float(np.min(s[cap - 1] - s[cap])) if cap < N else 1.0
    zs = -np.sort(-z, axis=1)
    margin = float(np.min(zs[:, :cfg.k] - zs[:, 1:cfg.k + 1]))
    if cfg.priority == 1:
        chosen = np.argsort(-z, axis=1, kind="stable")[:, :cfg.k]
        for j in range(cfg.k):
            ps = np.sort(p[np.arange(N), chosen[:, j]])
            margin = min(margin, float(np.min(np.diff(ps))))
    return margin


def routing_gradients_pass_gradcheck():
    E, N, C, H = 4, 12, 5, 4
    cases = [("topk_renorm0", routing_cfg(E, 2, renorm=0)),
             ("topk_renorm1", routing_cfg(E, 2, renorm=1)),
             ("topk_k1_renorm0", routing_cfg(E, 1, renorm=0)),
             ("topk_renorm1_capacity_order", routing_cfg(E, 2, renorm=1, cf=0.5)),
             ("topk_renorm0_capacity_score", routing_cfg(E, 2, renorm=0, cf=0.5, priority=1)),
             ("expert_choice", routing_cfg(E, 2, router=1, cf=1.0))]
    for name, cfg in cases:
        for seed in range(100):  # a draw whose routing has no near-tie
            inp = moe_inputs(N, C, E, H, seed, router_scale=2.0)
            z = (inp[0] @ inp[1].t()).numpy()
            p = torch.softmax(torch.from_numpy(z), -1).numpy()
            if routing_margin(z, p, cfg) > 1e-4:
                break
        _, kept = tm.route_tokens(z, p, cfg)
        dropped = 0 if kept is None else int((~kept).sum())
        inp = [t.requires_grad_(True) for t in inp]

        def f(*x):
            out, balance, z_loss, _ = tm.moe_forward(*x, cfg)
            return out, balance, z_loss

        try:
            ok = torch.autograd.gradcheck(f, inp, eps=1e-6, atol=1e-6, rtol=1e-5)
            detail = ""
        except RuntimeError as err:
            ok, detail = False, str(err).splitlines()[0]
        needs_drops = cfg.cf > 0 and cfg.router == 0
        check(f"routing_gradients_pass_gradcheck[{name}]", ok and (dropped > 0 or not needs_drops),
              f"seed {seed}, {dropped} assignments dropped {detail}")


def model_gradients_match_finite_differences():
    """whole MoE model in float64 (capacity drops, aux and z losses): autograd vs central differences"""
    _, _, model = build("-e", "4", "-k", "2", "--moe-layers", "all", "--capacity-factor", "0.75",
                        "--router-std", "0.5", dtype=torch.float64)
    alpha, beta = 0.01, 0.001

    def total(with_grad=False):
        with torch.set_grad_enabled(with_grad):
            _, loss, aux, zl, routing = model.forward(INPUTS, TARGETS)
            return loss + alpha * aux + beta * zl, routing

    t, routing0 = total(True)
    t.backward()
    dropped = sum(int((r[2] == 0).sum()) for r in routing0)
    rng = np.random.default_rng(0)
    worst, tested, flipped = 0.0, 0, 0
    for p in (tm.P_WTE, tm.P_QKVW, tm.P_LN2W, tm.P_ROUTERW, tm.P_EXPERT_FCW, tm.P_EXPERT_FCB, tm.P_EXPERT_FCPROJW,
              tm.P_EXPERT_FCPROJB):
        param = model.params[p]
        flat = param.data.view(-1)
        for i in rng.choice(flat.numel(), 3, replace=False):
            old = flat[i].item()
            eps = 1e-6
            flat[i] = old + eps
            up, r_up = total()
            flat[i] = old - eps
            down, r_down = total()
            flat[i] = old
            same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
                       for a, b in zip(r_up + r_down, routing0 + routing0))
            if not same:
                flipped += 1
                continue
            fd = (up.item() - down.item()) / (2 * eps)
            ad = param.grad.view(-1)[i].item()
            worst = max(worst, abs(fd - ad) / max(1e-4, abs(ad)))
            tested += 1
    check("model_gradients_match_finite_differences", worst < 1e-5 and tested >= 20 and dropped > 0,
          f"{tested} coordinates, worst relative error {worst:.1e}, {flipped} skipped (routing flipped), "
          f"{dropped} assignments dropped")


# ----------------------------------------------------------------------------
# 5. files: checksum, checkpoints, the debug state written by the command line

def fnv1a_matches_bytewise_definition():
    rng = np.random.default_rng(3)
    ok = tm.fnv1a64(b"") == tm.FNV_OFFSET and tm.fnv1a64(b"a") == 0xaf63dc4c8601ec8c  # FNV-1a 64 test vector
    for n in (1, 2, 7, 255, 1000, 4099):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        ok &= tm.fnv1a64(data) == tm.fnv1a64_slow(data) == tm.fnv1a64(data, chunk=64)
    check("fnv1a_matches_bytewise_definition", ok, "vectorised hash equals the byte loop (and the 'a' test vector)")


def moe_checkpoint_round_trip():
    cfg, params = tm.build_model(args_for(DENSE, "-e", "8", "-k", "3", "--granularity", "2", "--init", "drop",
                                          "--moe-layers", "0,3", "--capacity-factor", "1.1", "--renorm", "0",
                                          "--capacity-priority", "score"))
    path = os.path.join(TMP, "moe_rt.bin")
    tm.write_moe_checkpoint(path, cfg, params)
    cfg2, params2 = tm.read_checkpoint(path)
    fields = ["maxT", "V", "Vp", "L", "NH", "C", "E", "k", "G", "H", "moe", "renorm", "router", "cf", "priority", "init"]
    same_cfg = all(getattr(cfg, f) == getattr(cfg2, f) for f in fields)
    same_params = all(np.array_equal(a, b) for a, b in zip(params, params2))
    check("moe_checkpoint_round_trip", same_cfg and same_params and cfg2.init == 1 and cfg2.moe == [1, 0, 0, 1],
          f"E={cfg2.E} k={cfg2.k} G={cfg2.G} H={cfg2.H} cf={cfg2.cf} layers {cfg2.moe_layer_list()}, "
          f"{sum(p.size for p in params2)} values equal")
    raw = bytearray(open(path, "rb").read())
    raw[1024 + 4 * 1000] ^= 0x01
    bad = os.path.join(TMP, "moe_bad.bin")
    open(bad, "wb").write(bytes(raw))
    ok1, msg1 = expect_error(lambda: tm.read_checkpoint(bad), "checksum mismatch")
    open(bad, "wb").write(bytes(raw[:-4]))
    ok2, msg2 = expect_error(lambda: tm.read_checkpoint(bad), "truncated")
    raw2 = bytearray(raw)
    raw2[0:4] = np.int32(12345).tobytes()
    open(bad, "wb").write(bytes(raw2))
    ok3, msg3 = expect_error(lambda: tm.read_checkpoint(bad), "bad magic")
    check("corrupt_checkpoints_are_refused", ok1 and ok2 and ok3, f"{msg1} | {msg2} | {msg3}")


def dense_checkpoint_round_trip_and_bf16():
    cfg, params = tm.read_checkpoint(DENSE)
    path = os.path.join(TMP, "dense_rt.bin")
    tm.write_dense_checkpoint(path, cfg, params)
    same = open(path, "rb").read() == open(DENSE, "rb").read()
    # version 5: the upper 16 bits of each fp32
    header = np.frombuffer(open(DENSE, "rb").read(1024), dtype=np.int32).copy()
    header[1] = 5
    flat = tm.flatten_parameters(params[:16])
    bf16 = (flat.view(np.uint32) >> 16).astype(np.uint16)
    path5 = os.path.join(TMP, "dense_bf16.bin")
    with open(path5, "wb") as f:
        f.write(header.tobytes() + bf16.tobytes())
    _, params5 = tm.read_checkpoint(path5)
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)
    ok5 = np.array_equal(tm.flatten_parameters(params5[:16]), widened)
    check("dense_checkpoint_round_trip_and_bf16", same and ok5,
          f"v3 rewrite byte-identical: {same}; v5 read equals the widened bf16: {ok5}")


def debug_state_round_trip():
    state = os.path.join(TMP, "state.bin")
    model_path = os.path.join(TMP, "moe_debug.bin")
    steps = 3
    cmd = [sys.executable, SCRIPT, "debug", "-m", DENSE, "-i", SHARD, "-b", str(B), "-t", str(T), "--steps", str(steps),
           "--state", state, "--write-model", model_path, "-e", "8", "-k", "2", "--capacity-factor", "0.5",
           "--z-loss", "0.001"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        check("debug_state_round_trip", False, f"debug exited {r.returncode}: {r.stderr.strip()}")
        return
    s = tm.read_debug_state(state)
    cfg, params = tm.read_checkpoint(model_path)
    N = B * T
    header_ok = (s["B"], s["T"], s["V"], s["Vp"], s["C"], s["L"], s["E"], s["k"], s["Lm"], s["n_steps"], s["R"],
                 s["router"], s["P"]) == (B, T, 100, 128, 32, 4, 8, 2, 2, steps, N * 2, 0, tm.count_parameters(cfg))
    data_ok = np.array_equal(s["inputs"], TOKENS[:N]) and np.array_equal(s["targets"], TOKENS[1:N + 1])
    model = tm.Model(cfg, params)
    logits, loss, aux, zl, routing = model.forward(INPUTS, TARGETS)
    logit_err = np.abs(logits.detach()[:, :, :100].numpy().ravel() - s["logits"]).max()
    loss_ok = abs(loss.item() - s["loss"]) < 1e-6 and abs(aux.item() - s["aux_loss"]) < 1e-6 and \
        abs(zl.item() - s["z_loss"]) < 1e-5 and abs(s["losses"][0] - s["loss"]) == 0
    routing_ok = all(np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2]) and np.abs(a[1] - b[1]).max() < 1e-7
                     for a, b in zip(routing, s["routing"]))
    dropped = sum(int((r[2] == 0).sum()) for r in s["routing"])
    # renorm 1: each token's k weights sum to 1, its dropped choices included
    weight_sums = np.concatenate([r[1].reshape(N, 2).sum(1) for r in s["routing"]])
    routing_ok &= np.abs(weight_sums - 1).max() < 1e-6
    check("debug_state_round_trip", header_ok and data_ok and logit_err < 1e-6 and loss_ok and routing_ok and dropped > 0,
          f"header {header_ok}, batch {data_ok}, logits max |diff| {logit_err:.1e}, losses {loss_ok}, "
          f"routing {routing_ok} ({dropped} dropped), {len(s['losses'])} step losses")
    # the same run from the written MoE checkpoint (routing options from its header) gives the same state
    state2 = os.path.join(TMP, "state2.bin")
    cmd2 = [sys.executable, SCRIPT, "debug", "-m", model_path, "-i", SHARD, "-b", str(B), "-t", str(T), "--steps",
            str(steps), "--state", state2, "--z-loss", "0.001"]
    r2 = subprocess.run(cmd2, capture_output=True, text=True)
    same = r2.returncode == 0 and open(state, "rb").read() == open(state2, "rb").read()
    check("moe_checkpoint_carries_routing_options", same, "debug from the MoE checkpoint writes a byte-identical state")


# ----------------------------------------------------------------------------
# 6. capacity and priority

def capacity_follows_priority_rule():
    E, k, N = 8, 2, 64
    for priority in (0, 1):
        cfg = routing_cfg(E, k, cf=0.5, priority=priority)
        rng = np.random.default_rng(5 + priority)
        z = rng.normal(size=(N, E)) + np.linspace(0, 2, E)  # an imbalanced router: late experts overflow
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        chosen, kept = tm.route_tokens(z, p, cfg)
        cap = tm.token_choice_capacity(cfg, N)
        ok = cap == math.ceil(0.5 * k * N / E)
        for e in range(E):
            n_assigned = int((chosen == e).sum())
            n_kept = int(((chosen == e) & kept).sum())
            ok &= n_kept == min(cap, n_assigned)
            for j in range(k):
                toks = np.nonzero(chosen[:, j] == e)[0]
                if priority == 1:  # by decreasing p of the choice, ties to the lower token
                    toks = toks[np.argsort(-p[toks, e], kind="stable")]
                flags = kept[toks, j]
                ok &= not np.any(flags[1:] & ~flags[:-1])  # kept ones are a prefix of the priority order
                if j > 0 and flags.any():  # a later choice admitted: every earlier choice of e was
                    ok &= bool(np.all(kept[:, :j][chosen[:, :j] == e]))
        check(f"capacity_follows_priority_rule[{tm.PRIORITIES[priority]}]", ok and (~kept).sum() > 0,
              f"cap {cap}, {(~kept).sum()} of {N * k} assignments dropped, kept counts "
              f"{[int(((chosen == e) & kept).sum()) for e in range(E)]}")
    # expert choice: each expert its cap tokens of highest p, in token order
    cfg = routing_cfg(E, k, router=1)
    tokens, _ = tm.route_tokens(z, p, cfg)
    cap = tm.expert_choice_capacity(cfg, N)
    ok = tokens.shape == (E, cap) and cap == math.ceil(k * N / E)
    for e in range(E):
        ok &= np.array_equal(tokens[e], np.sort(np.argsort(-p[:, e], kind="stable")[:cap]))
    check("expert_choice_takes_top_cap_tokens", ok, f"cap {cap} = ceil(k*N/E) tokens per expert in token order")


# ----------------------------------------------------------------------------
# options, errors, schedule

def bad_options_are_refused():
    cases = [(("-e", "8", "-k", "1"), "k=1 with --renorm 1"),
             (("-e", "4", "-k", "5"), "must be between 1 and E=4"),
             (("-e", "6", "--granularity", "4"), "not a multiple of the granularity"),
             (("-e", "4", "--moe-layers", "1,1"), "listed twice"),
             (("-e", "4", "--moe-layers", "9"), "out of range"),
             (("-e", "4", "--moe-layers", "last0"), "lastN"),
             (("-e", "4", "--moe-layers", "x"), "comma-separated")]
    ok_all, details = True, []
    for options, text in cases:
        ok, msg = expect_error(lambda: tm.build_model(args_for(DENSE, *options)), text)
        ok_all &= ok
        details.append(f"{' '.join(options)}: {'ok' if ok else 'WRONG: ' + msg}")
    check("bad_options_are_refused", ok_all, "; ".join(details))
    short = os.path.join(TMP, "short.bin")
    tm.write_shard(short, np.zeros(100, dtype=np.uint16))
    r = subprocess.run([sys.executable, SCRIPT, "debug", "-m", DENSE, "-i", short, "-b", "4", "-t", "16", "--steps", "2",
                        "--state", os.path.join(TMP, "never.bin")], capture_output=True, text=True)
    one_line = r.stderr.strip().count("\n") == 0 and "need 129" in r.stderr
    check("short_shard_is_refused", r.returncode == 1 and one_line and not os.path.exists(os.path.join(TMP, "never.bin")),
          f"exit {r.returncode}: {r.stderr.strip()}")


def lr_schedule_values():
    def lr(step, max_steps, *options):
        return tm.learning_rate(step, max_steps, args_for(DENSE, "-l", "1.0", "-q", "0.1", *options))
    ok = abs(lr(0, 10, "-u", "4") - 0.25) < 1e-15 and abs(lr(3, 10, "-u", "4") - 1.0) < 1e-15
    ok &= abs(lr(4, 10, "-u", "4") - 1.0) < 1e-15 and abs(lr(7, 10, "-u", "4") - (0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))) < 1e-15
    ok &= lr(9, 10, "--lr-schedule", "constant") == 1.0
    ok &= lr(7, 10, "--lr-schedule", "wsd", "--decay-frac", "0.2") == 1.0
    ok &= abs(lr(8, 10, "--lr-schedule", "wsd", "--decay-frac", "0.2") - 0.55) < 1e-15
    ok &= abs(lr(9, 10, "--lr-schedule", "wsd", "--decay-frac", "0.2") - 0.1) < 1e-15
    check("lr_schedule_values", ok, "warmup, cosine midpoint, constant, wsd decay to the floor")


def main():
    for fn in (upcycled_copy_matches_dense_logits, rng_matches_scalar_formula, drop_upcycling_redraws_floor_rH_units,
               drop_draws_follow_the_counter_rng, noise_upcycling_perturbs_floor_rH_units, granularity_shards_scaling_and_virtual_groups,
               aux_losses_match_formulas, routing_gradients_pass_gradcheck, model_gradients_match_finite_differences,
               fnv1a_matches_bytewise_definition, moe_checkpoint_round_trip, dense_checkpoint_round_trip_and_bf16,
               debug_state_round_trip, capacity_follows_priority_rule, bad_options_are_refused, lr_schedule_values):
        run_check(fn)
    shutil.rmtree(TMP, ignore_errors=True)
    print(f"{results['pass']} passed, {results['fail']} failed")
    sys.exit(1 if results["fail"] else 0)


if __name__ == "__main__":
    main()
