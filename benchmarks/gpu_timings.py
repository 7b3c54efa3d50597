"""Times every CUDA op of the engine against its baseline, and merges end to end, on the GPU.

Run by benchmarks/gpu_check.sh after the build and the CUDA tests. Prints one markdown table last
(and writes it to the path given with --out). Every row is measured in this run: ratios compare
against a baseline timed on the same card minutes apart. CUDA times are medians of CUDA-event
timings after warm-up; host baselines use time.perf_counter.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from fastmerge.spec.transforms import apply_permutations

ROWS: list[tuple[str, str, str, str, str]] = []  # (op, fastmerge, baseline, ratio, target / note)


def gpu_time(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def row(op, ours, base, ratio, note):
    ROWS.append((op, ours, base, ratio, note))
    print(f"{op}: {ours} | {base} | {ratio} | {note}", flush=True)


def rel_fro(a, b) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def covariance(rows: int = 65536, cols: int = 4096):
    from fastmerge.ops import CovarianceState

    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.relu(torch.randn(rows, cols, device="cuda", generator=gen)) + 3.0  # post-ReLU-like, large mean
    import os

    for dtype, products in ((torch.float32, "auto"), (torch.float32, "float"), (torch.bfloat16, "auto")):
        os.environ["FASTMERGE_COV_PRODUCTS"] = products  # read by the op at each call
        x = base.to(dtype)
        state = CovarianceState([cols], device="cuda")
        t_ours = gpu_time(lambda: state.update(x))
        try:  # where the time goes (kernels of one update), for the log
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                state.update(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=8), flush=True)
        except Exception as exc:  # noqa: BLE001 - the profile is informative only
            print(f"profile unavailable: {exc}")
        t_gemm = gpu_time(lambda: torch.mm(x.T, x))
        # accuracy: the same features streamed in 8 batches, against float64 on the device
        state = CovarianceState([cols], device="cuda")
        for chunk in x.split(rows // 8):
            state.update(chunk)
        xd = x.double()
        centred = xd - xd.mean(0)
        ref = centred.T @ centred / (rows - 1)
        err = rel_fro(state.covariance(), ref)
        xf = x.float()
        naive = (xf.T @ xf - rows * torch.outer(xf.mean(0), xf.mean(0))) / (rows - 1)
        err_naive = rel_fro(naive, ref)
        del xd, centred, ref, naive, xf
        torch.cuda.empty_cache()
        name = str(dtype).replace("torch.", "")
        os.environ.pop("FASTMERGE_COV_PRODUCTS")
        label = {"auto": "", "float": ", float32 products forced"}[products]
        row(f"covariance update {rows}x{cols} {name}{label}", f"{t_ours * 1e3:.2f} ms",
            f"{t_gemm * 1e3:.2f} ms (torch.mm(x.T, x), {name})", f"{t_gemm / t_ours:.2f}x GEMM speed",
            f"target >= 0.8x; rel. error {err:.1e} (naive one-pass float32: {err_naive:.1e})")


def combine(total: int = 100_000_000, tensor: int = 4_000_000):
    gen = torch.Generator(device="cuda").manual_seed(0)
    src = torch.empty(total, device="cuda").normal_(generator=gen)
    dst = torch.empty_like(src)
    t_copy = gpu_time(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 4 / t_copy
    for k in (2, 4):
        models = [[torch.randn(tensor, device="cuda", generator=gen) for _ in range(total // tensor)] for _ in range(k)]
        flat = [models[j][t] for t in range(total // tensor) for j in range(k)]
        out = [torch.empty(tensor, device="cuda") for _ in range(total // tensor)]
        w = [1.0 / k] * k
        t = gpu_time(lambda: torch.ops.fastmerge.combine_out(flat, [], w, k, out))
        t_torch = gpu_time(lambda: [sum(w[j] * models[j][i] for j in range(k)) for i in range(total // tensor)])
        bw = (k + 1) * total * 4 / t
        row(f"combine {k} models, 100M float32 params", f"{t * 1e3:.2f} ms ({bw / 1e12:.2f} TB/s)",
            f"copy {copy_bw / 1e12:.2f} TB/s; torch expression {t_torch * 1e3:.2f} ms",
            f"{bw / copy_bw:.2f} of copy bandwidth", "target >= 0.8")
    torch.cuda.empty_cache()


def np_merge_ops(total: int = 50_000_000, tensor: int = 5_000_000):
    gen = torch.Generator(device="cuda").manual_seed(1)
    n = total // tensor
    a = [torch.randn(tensor, device="cuda", generator=gen) for _ in range(n)]
    b = [torch.randn(tensor, device="cuda", generator=gen) for _ in range(n)]
    logits = [torch.zeros(tensor, device="cuda", requires_grad=True) for _ in range(n)]
    grads = [torch.randn(tensor, device="cuda", generator=gen) for _ in range(n)]

    def fused():
        out = torch.ops.fastmerge.sigmoid_merge(a, b, logits)
        torch.autograd.backward(out, grads)

    def plain():
        out = [torch.sigmoid(l) * x + (1 - torch.sigmoid(l)) * y for l, x, y in zip(logits, a, b)]
        torch.autograd.backward(out, grads)

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t_fused = gpu_time(fused)
    peak_fused = torch.cuda.max_memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    t_plain = gpu_time(plain)
    peak_plain = torch.cuda.max_memory_allocated() - before
    row("NP Merge merge+backward, 50M params, per-entry logits", f"{t_fused * 1e3:.2f} ms, +{peak_fused / 2**20:.0f} MiB",
        f"{t_plain * 1e3:.2f} ms, +{peak_plain / 2**20:.0f} MiB (per-tensor autograd)", f"{t_plain / t_fused:.2f}x faster", "")


def assignment_scipy_background(n: int):
    """Starts scipy on the host for an n x n problem in a subprocess (it can take a minute)."""
    code = (
        "import numpy as np, time, json; from scipy.optimize import linear_sum_assignment as l;"
        f"c = np.random.default_rng(0).random(({n}, {n})); t = time.perf_counter(); r, k = l(c);"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'total': float(c[r, k].sum()), 'cols': k[:64].tolist()}))"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    process.started = time.time()
    return process


def lap_gpu_seconds(n: int) -> dict:
    """One n x n uniform problem on the GPU (run in a child process so a time limit can stop it)."""
    from fastmerge.ops import linear_assignment

    cost = torch.from_numpy(np.random.default_rng(0).random((n, n)))
    gpu = cost.cuda()
    linear_assignment(gpu[:64, :64])  # load and warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    rows, cols = linear_assignment(gpu)
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "total": float(cost[rows.cpu(), cols.cpu()].sum()),
            "cols": cols[:64].cpu().tolist()}


def assignment(background, limit: float = 150.0):
    from scipy.optimize import linear_sum_assignment

    from fastmerge.ops import linear_assignment

    for n in (4096, 16384):
        try:
            done = subprocess.run([sys.executable, __file__, "--lap", str(n)], capture_output=True, text=True, timeout=limit)
            gpu = json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:
            row(f"assignment n={n} uniform float64", f"> {limit:.0f} s" if isinstance(exc, subprocess.TimeoutExpired)
                else "FAILED", "", "", str(exc)[:120])
            continue
        if n == 4096:
            cost = np.random.default_rng(0).random((n, n))
            start = time.perf_counter()
            r, c = linear_sum_assignment(cost)
            t_scipy = time.perf_counter() - start
            ref_total, same = float(cost[r, c].sum()), c[:64].tolist() == gpu["cols"]
            start = time.perf_counter()
            linear_assignment(torch.from_numpy(cost))
            extra = f"; fastmerge CPU op {time.perf_counter() - start:.2f} s"
            scipy_text = f"{t_scipy:.2f} s"
        else:
            try:
                result = json.loads(background.communicate(timeout=max(1.0, 240 - (time.time() - background.started)))[0])
                t_scipy, ref_total, same = result["seconds"], result["total"], gpu["cols"] == result["cols"]
                scipy_text = f"{t_scipy:.1f} s"
            except subprocess.TimeoutExpired:
                background.kill()
                t_scipy, ref_total, same = time.time() - background.started, float("nan"), "n/a"
                scipy_text = f"> {t_scipy:.0f} s (stopped)"
            extra = ""
        row(f"assignment n={n} uniform float64", f"{gpu['seconds']:.3f} s", f"scipy (host) {scipy_text}{extra}",
            f"{t_scipy / gpu['seconds']:.1f}x faster", f"optimum {gpu['total']:.6f} vs scipy {ref_total:.6f}, same assignment: {same}")
    costs = torch.rand(64, 128, 128, dtype=torch.float64, device="cuda")
    t = gpu_time(lambda: linear_assignment(costs), warmup=2, iters=10)
    host = costs.cpu().numpy()
    start = time.perf_counter()
    for c in host:
        linear_sum_assignment(c)
    t_scipy = time.perf_counter() - start
    ours = linear_assignment(costs)[1].cpu()
    same = all(bool((torch.from_numpy(linear_sum_assignment(c)[1]) == ours[i]).all()) for i, c in enumerate(host))
    row("assignment batch 64 x (128 x 128)", f"{t * 1e3:.2f} ms", f"scipy loop (host) {t_scipy * 1e3:.1f} ms",
        f"{t_scipy / t:.1f}x faster", f"target < 10 ms; same assignments: {same}")


_GPT2 = []


def gpt2_pair():
    """The traced GPT-2-small pair (tracing takes a while: done once)."""
    if not _GPT2:
        from fastmerge.bench.merge_workloads import gpt2_small_pair

        _GPT2.append(gpt2_small_pair())
    return _GPT2[0]


def transform():
    spec, state, _ = gpt2_pair()
    perms = spec.random_permutations(torch.Generator().manual_seed(3))
    names = list(state)
    tensors = [state[k].cuda() for k in names]
    jobs = []
    for g in spec.groups:
        if g.count != 1:
            continue
        for m in g.members:
            if m.tensor in state and state[m.tensor].shape[m.axis] == g.size:
                jobs.append((names.index(m.tensor), m.axis, perms[g.name][0].cuda()))
    jobs.sort(key=lambda j: j[0])
    index, axis, mats = [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs]
    t_ours = gpu_time(lambda: torch.ops.fastmerge.transform_axes(tensors, mats, index, axis))

    def plain():
        out = list(tensors)
        for i, a, p in jobs:
            out[i] = out[i].index_select(a, p)
        return out

    t_plain = gpu_time(plain)
    row(f"transform_axes, GPT-2-small, {len(jobs)} permutation jobs", f"{t_ours * 1e3:.2f} ms",
        f"{t_plain * 1e3:.2f} ms (index_select loop)", f"{t_plain / t_ours:.2f}x", "")


def weight_matching_gpt2():
    from fastmerge.alignment.weight_matching import weight_matching

    spec, state, permuted = gpt2_pair()
    gs = {k: v.cuda() for k, v in state.items()}
    gp = {k: v.cuda() for k, v in permuted.items()}
    torch.cuda.synchronize()
    start = time.perf_counter()
    perms, diag = weight_matching(spec, [gs, gp])
    torch.cuda.synchronize()
    t = time.perf_counter() - start
    sweeps = len(diag["history"][1]) - 1
    aligned = apply_permutations(spec, gp, {k: v.cuda() if torch.is_tensor(v) else v for k, v in perms[1].items()})
    ok = all(bool((aligned[k] == gs[k]).all()) for k in gs)
    row("weight matching GPT-2-small, all 49 groups to convergence", f"{t:.1f} s ({sweeps} sweeps)",
        "CPU (2-core EPYC, benchmarks/RESULTS.md): 64.4 s", f"{64.4 / t:.1f}x", f"permutation recovered: {ok}")


def np_merge_step_gpt2():
    from fastmerge import zoo
    from fastmerge.merging.np_merge import CoefficientMerger

    torch.manual_seed(0)
    parents = [zoo.gpt2(vocab_size=50257, block_size=64, dim=768, depth=12, heads=12).cuda().eval() for _ in range(2)]
    x = torch.randint(0, 50257, (8, 64), device="cuda")
    weights = [{k: v.detach() for k, v in p.named_parameters()} for p in parents]
    names = list(weights[0])
    buffers = dict(parents[0].named_buffers())
    results = {}
    for variant in ("fastmerge", "plain"):
        merger = CoefficientMerger(weights, names)
        opt = torch.optim.Adam(list(merger.logits.values()), lr=1e-2)

        def merged():
            if variant == "fastmerge":
                return merger.merged_params()
            return {k: torch.sigmoid(merger.logits[k][0]) * weights[0][k] + (1 - torch.sigmoid(merger.logits[k][0])) * weights[1][k]
                    for k in names}

        def step():
            out = torch.func.functional_call(parents[0], {**merged(), **buffers}, (x,))
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t = gpu_time(step, warmup=1, iters=5)
        results[variant] = (t, torch.cuda.max_memory_allocated() - before)
    (t_f, m_f), (t_p, m_p) = results["fastmerge"], results["plain"]
    row("NP Merge step, GPT-2-small, batch 8x64", f"{t_f * 1e3:.1f} ms, +{m_f / 2**20:.0f} MiB",
        f"{t_p * 1e3:.1f} ms, +{m_p / 2**20:.0f} MiB (per-tensor autograd)", f"{t_p / t_f:.2f}x faster", "target >= 1.5x, no more memory")


def pipeline_resnet():
    from fastmerge import merge, zoo

    torch.manual_seed(0)
    models = [zoo.resnet20(in_channels=3, width=4).eval() for _ in range(2)]
    data = [torch.randn(256, 3, 32, 32) for _ in range(4)]
    for method in ("permute", "cca"):
        timings = {}
        for device in ("cpu", "cuda"):
            ms = [copy.deepcopy(m).to(device) for m in models]
            batches = [x.to(device) for x in data]
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            merge(ms, method, data=batches, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            timings[device] = time.perf_counter() - start
        row(f"merge end to end, 2 x ResNet-20x4, {method}, 1024 images", f"{timings['cuda']:.2f} s (GPU)",
            f"{timings['cpu']:.2f} s (16-core host)", f"{timings['cpu'] / timings['cuda']:.1f}x", "statistics, alignment, merge, BN reset")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--lap", type=int, default=0, help="(internal) time one n x n assignment, print JSON")
    args = parser.parse_args()
    if args.lap:
        print(json.dumps(lap_gpu_seconds(args.lap)))
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    background = assignment_scipy_background(16384)
    for part in (covariance, combine, np_merge_ops, transform, lambda: assignment(background), np_merge_step_gpt2,
                 weight_matching_gpt2, pipeline_resnet):
        try:
            part()
        except Exception as exc:  # one failing part must not hide the others' numbers
            name = getattr(part, "__name__", "assignment")
            row(name, "FAILED", type(exc).__name__, str(exc)[:200].replace("|", "/"), "")
        torch.cuda.empty_cache()
    table = ["| op | fastmerge | baseline | ratio | target / check |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in ROWS]
    text = f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + "\n".join(table)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
