"""CUDA correctness of every Triton kernel variant against a float64 reference; skipped without CUDA.

    python -m pytest tests/gpu -q                  # on the GPU machine: every case below
    python tests/gpu/test_gpu_kernels.py [--final | --routes | --all]   # the same checks as a script,
                                                   # one line a case and a summary; exits 1 on a failure

Every block size, bf16 / fp16 / fp32 (tf32 off and on), autotuned and fixed tiles (split slots, split
tokens, narrow gathers, parts of blocks, masked-dense tiles), the TMA forward, decode and prefill token
counts not multiple of the tile, K from 1 to C; outputs are NaN-poisoned before the kernel writes them
(split partials too); each gradient is computed twice and must be bitwise identical; the device-side
column check is on. Also: the eager route against the registered op (bitwise), the column view against
a stable sort, the exact tiles the autotuner picked in the benchmark run (``--final``), and a column
outside [0, C) (read nothing with the check off; a device-side assert with it on, in a child process).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import sparsify  # noqa: E402
from sparsify.kernels import dispatch, reference  # noqa: E402
from sparsify.kernels.column_view import column_view  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="the GPU checks need CUDA")
TOL = {torch.float32: 1e-5, "tf32": 5e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def topology(rows: int, cols: int, k: int) -> torch.Tensor:
    return torch.rand(rows, cols, device="cuda").argsort(dim=1)[:, :k].to(torch.int32)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def check(m, in_f, out_f, block, k, dtype, tf32, config=None, tma="auto") -> tuple[bool, str]:
    """Forward, grad_input (twice) and grad_values (twice) against float64: (ok, one line)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    kernels = dispatch.triton_kernels()
    block_rows, cols = out_f // block, in_f // block
    x = torch.randn(m, in_f, device="cuda", dtype=dtype)
    g = torch.randn(m, out_f, device="cuda", dtype=dtype)
    v = (torch.randn(block_rows, k, block, block, device="cuda") / (k * block) ** 0.5).to(dtype)
    b = torch.randn(out_f, device="cuda", dtype=dtype)
    col = topology(block_rows, cols, k)
    fc, ic, vc = (config or {}).get("fwd"), (config or {}).get("gi"), (config or {}).get("gv")
    with sparsify.kernel_options(tma=tma):
        y = kernels.forward(x, v, col, b, config=fc, out=poisoned(m, out_f, dtype=dtype), poison=True)
        gi, gi2 = [kernels.grad_input(g, v, col, in_f, config=ic, out=poisoned(m, in_f, dtype=dtype)) for _ in range(2)]
        gv, gv2 = [kernels.grad_values(g, x, col, block, config=vc, poison=True,
                                       out=poisoned(block_rows, k, block, block, dtype=dtype)) for _ in range(2)]
    xd, vd, gd, bd = x.double(), v.double(), g.double(), b.double()
    errs = (
        rel(y, reference.forward(xd, vd, col, bd)),
        rel(gi, reference.grad_input(gd, vd, col, in_f)),
        rel(gv, reference.grad_values(gd, xd, col, block)),
    )
    same = torch.equal(gi, gi2) and torch.equal(gv, gv2)
    tol = TOL["tf32"] if (dtype == torch.float32 and tf32) else TOL[dtype]
    ok = all(e < tol for e in errs) and same
    name = NAMES[dtype] + ("/tf32" if tf32 else "")
    line = (f"{'ok  ' if ok else 'FAIL'} M={m} {in_f}->{out_f} B={block} K={k}/{cols} {name} cfg={config is not None} "
            f"tma={tma}: fwd {errs[0]:.2e} grad_input {errs[1]:.2e} grad_values {errs[2]:.2e} bitwise-repeat {same}")
    return ok, line


# (m, in, out, B, K, dtype, tf32, config, tma) for check()
def _fixed(block: int, m: int) -> dict:
    bm = 64 if m > 32 else 16
    return {"fwd": {"BM": bm, "KSB": max(block, 128), "num_stages": 2},
            "gi": {"BM": bm, "TSB": max(block, 128), "num_stages": 2},
            "gv": {"BM": bm, "GSB": max(block, 128), "num_stages": 2}}


def main_cases() -> list:
    """Every block size and dtype over decode and prefill shapes: autotuned first, fixed tiles after."""
    cases = []
    for block in (16, 32, 64, 128):
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)):
            shapes = [
                (77, 6 * block, 5 * block, 1),
                (77, 6 * block, 5 * block, 6),
                (13, 8 * block, 4 * block, 3),
                (1000, 8 * block, 16 * block, 4),
                (3000, 1024, 512, max(1, 1024 // block // 2)),
            ]
            if dtype != torch.bfloat16:
                shapes = shapes[1:2] + shapes[3:4]
            for n, (m, in_f, out_f, k) in enumerate(shapes):
                cases.append((m, in_f, out_f, block, k, dtype, tf32, None if n == 0 else _fixed(block, m), "auto"))
    return cases


def variant_cases() -> list:
    """Fixed tiles the autotuner may not pick: split slots, split tokens, narrow gathers, parts of
    blocks, masked-dense tiles; and the TMA forward (also at B = 64)."""
    cases = []
    for block in (16, 32, 64, 128):
        for dtype in (torch.bfloat16, torch.float32):
            cfgs = [{"fwd": {"BM": 16, "KSB": max(block, 128), "SPLIT": 3}, "gi": {"BM": 32, "TSB": max(block, 64)},
                     "gv": {"BM": 32, "GSB": max(block, 64), "SPLIT": 3}}]
            if block >= 128:
                cfgs.append({"fwd": {"BM": 64, "KSB": 64, "num_stages": 4}, "gi": {"BM": 64, "TSB": 64, "num_stages": 4},
                             "gv": {"BM": 64, "GSB": 64, "num_stages": 4}})
            if block <= 64:
                tile = {"BM": 64, "BN": 128, "BK": 64, "num_stages": 3}
                cfgs.append({"fwd": {"tile": tile}, "gi": {"tile": tile},
                             "gv": {"tile": {"BO": 128, "BI": 64, "BT": 64, "num_stages": 3}, "SPLIT": 2}})
            cases += [(200, 7 * block, 3 * block, block, 5, dtype, False, cfg, "auto") for cfg in cfgs]
    for block in (64, 128):
        for dtype in (torch.bfloat16, torch.float32):
            cases.append((3000, 1024, 512, block, 1024 // block // 2, dtype, False, None, "on"))
    return cases


def final_cases() -> list:
    """The exact tiles the autotuner picked in the H100 benchmark run (benchmarks/results), for B = 64/128
    (gather kernels, parts of blocks), B = 16/32 (masked-dense tiles), and the TMA forward."""
    big = {"fwd": {"BM": 256, "KSB": 64, "num_warps": 8, "num_stages": 5},
           "gi": {"BM": 256, "TSB": 64, "num_warps": 8, "num_stages": 5},
           "gv": {"BM": 64, "GSB": 256, "num_warps": 8, "num_stages": 3}}
    mid = {"fwd": {"BM": 128, "KSB": 64, "num_warps": 4, "num_stages": 5},
           "gi": {"BM": 128, "TSB": 64, "num_warps": 4, "num_stages": 5},
           "gv": {"BM": 128, "GSB": 128, "num_warps": 8, "num_stages": 3}}
    small_fp32 = {"fwd": {"BM": 64, "KSB": 64, "num_warps": 4, "num_stages": 3},
                  "gi": {"BM": 64, "TSB": 64, "num_warps": 4, "num_stages": 3},
                  "gv": {"BM": 64, "GSB": 64, "num_warps": 4, "num_stages": 3}}
    tile = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
    tiles = {"fwd": {"tile": tile}, "gi": {"tile": tile},
             "gv": {"tile": {"BO": 128, "BI": 256, "BT": 64, "num_warps": 8, "num_stages": 3}}}
    runs = [
        (128, torch.bfloat16, big), (128, torch.bfloat16, mid), (64, torch.bfloat16, big), (64, torch.bfloat16, mid),
        (128, torch.float32, small_fp32), (64, torch.float32, small_fp32),
        (16, torch.bfloat16, tiles), (32, torch.bfloat16, tiles),
    ]
    cases = [(1000, 8 * b if b >= 64 else 1024, 4 * b if b >= 64 else 640, b, 4 if b >= 64 else 1024 // b // 2,
              dtype, False, cfg, "auto") for b, dtype, cfg in runs]
    cases += [(3000, 1024, 512, 128, 4, dtype, False, None, "on") for dtype in (torch.bfloat16, torch.float32)]
    return cases


def small_fp32_cases() -> list:
    """Small float32 problems launch one untimed config: it must fit in shared memory (a 64x64-block
    grad_values config asked for 240 KB here once; common.tuning_candidates prevents it)."""
    return [(m, in_f, out_f, block, max(1, in_f // block // 2), torch.float32, True, None, "auto")
            for block in (16, 32, 64, 128) for in_f, out_f, m in ((256, 1024, 512), (1024, 256, 512), (512, 512, 16))]


def _case_id(case) -> str:
    m, in_f, out_f, block, k, dtype, tf32, config, tma = case
    return f"M{m}-{in_f}x{out_f}-B{block}-K{k}-{NAMES[dtype]}{'-tf32' if tf32 else ''}-{'cfg' if config else 'auto'}-tma_{tma}"


ALL_CASES = main_cases() + variant_cases() + final_cases() + small_fp32_cases()


@pytest.mark.parametrize("case", ALL_CASES, ids=[_case_id(c) for c in ALL_CASES])
def test_every_kernel_variant_matches_float64_and_repeats_bitwise(case):
    torch.manual_seed(0)
    ok, line = check(*case)
    assert ok, line


ROUTE_SHAPES = ((4096, 14336, 64, 2048), (14336, 4096, 16, 512), (1024, 512, 128, 16), (512, 2048, 32, 300))


def route_check(in_f, out_f, block, m) -> tuple[bool, str]:
    """The eager route against the registered op on CUDA (bitwise: output and every gradient, bf16
    autocast over float32 weights, bias and stats probe), and the one-launch column view against a sort."""
    from sparsify import BlockSparseLinear
    from sparsify.functional import block_ell_linear

    layer = BlockSparseLinear(in_f, out_f, block_size=block, density=0.5, device="cuda")
    x = torch.randn(m, in_f, device="cuda")
    g = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (block_ell_linear, torch.ops.sparsify.block_ell_linear):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.values, layer.bias, layer.stats_probe)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(leaves[0], leaves[1], layer.col_indices, leaves[2], leaves[3])
        y.backward(g)
        results.append([y] + [t.grad for t in leaves])
    same = all(torch.equal(a, b) for a, b in zip(*results))
    err = rel(results[0][0], reference.forward(x.bfloat16().double(), layer.values.bfloat16().double(),
                                               layer.col_indices, layer.bias.bfloat16().double()))
    slots, starts = column_view(layer.col_indices, in_f // block)
    flat = layer.col_indices.reshape(-1).long()
    view_ok = torch.equal(slots.long(), torch.sort(flat, stable=True).indices) and torch.equal(
        starts.long(), torch.searchsorted(flat.sort().values, torch.arange(in_f // block + 1, device="cuda")))
    ok = same and err < TOL[torch.bfloat16] and view_ok
    return ok, (f"{'ok  ' if ok else 'FAIL'} eager route vs op {in_f}->{out_f} B={block} M={m}: bitwise {same}, "
                f"fwd {err:.2e}; column view R*K={flat.numel()} C={in_f // block}: {view_ok}")


@pytest.mark.parametrize("shape", ROUTE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager_route_equals_the_op_and_column_view_equals_a_sort(shape):
    torch.manual_seed(2)
    ok, line = route_check(*shape)
    assert ok, line


@pytest.mark.parametrize("block, tile", [(16, True), (16, False), (128, False)])
def test_out_of_range_columns_read_nothing_on_the_gpu(block, tile):
    m, block_rows, cols, k = 300, 3, 4, 2
    x = torch.randn(m, cols * block, device="cuda")
    g = torch.randn(m, block_rows * block, device="cuda")
    values = torch.randn(block_rows, k, block, block, device="cuda")
    col = topology(block_rows, cols, k)
    col[1, 0], col[2, 1] = cols, 100000
    bad = (col >= cols)[:, :, None, None]
    kept, valid = values.masked_fill(bad, 0).double(), col.masked_fill(col >= cols, 0)
    kernels = dispatch.triton_kernels()
    with sparsify.kernel_options(check_columns=False, block_kernel="tile" if tile else "gather", tma="on"):
        y = kernels.forward(x, values, col, None)
        gx = kernels.grad_input(g, values, col, cols * block)
        gv = kernels.grad_values(g, x, col, block)
    torch.cuda.synchronize()
    assert rel(y, reference.forward(x.double(), kept, valid, None)) < 1e-5
    assert rel(gx, reference.grad_input(g.double(), kept, valid, cols * block)) < 1e-5
    good = ~bad[:, :, 0, 0]
    assert rel(gv[good], reference.grad_values(g.double(), x.double(), valid, block)[good]) < 1e-5


_ASSERTING_CHILD = """
import torch, sparsify
from sparsify.kernels import dispatch
x = torch.randn(8, 64, device="cuda"); v = torch.randn(2, 2, 16, 16, device="cuda")
col = torch.tensor([[0, 4], [1, 2]], dtype=torch.int32, device="cuda")
dispatch.triton_kernels().forward(x, v, col, None)
torch.cuda.synchronize()
print("NO ASSERT")
"""


def test_out_of_range_column_trips_the_device_assert():
    # a device-side assert ends the CUDA context: run it in a child process
    done = subprocess.run([sys.executable, "-c", _ASSERTING_CHILD], capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert done.returncode != 0 and "NO ASSERT" not in done.stdout, done.stdout + done.stderr[-2000:]
    assert "assert" in done.stderr.lower(), done.stderr[-2000:]


def _script() -> None:
    groups = {"--final": final_cases(), "--routes": small_fp32_cases()}
    chosen = next((flag for flag in groups if flag in sys.argv), None)
    cases = ALL_CASES if "--all" in sys.argv else groups[chosen] if chosen else main_cases() + variant_cases()
    torch.manual_seed(0)
    failures = 0
    for case in cases:
        ok, line = check(*case)
        failures += not ok
        print(line, flush=True)
    if chosen == "--routes" or "--all" in sys.argv:
        for shape in ROUTE_SHAPES:
            ok, line = route_check(*shape)
            failures += not ok
            print(line, flush=True)
    print(f"{failures} failures; device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    _script()
