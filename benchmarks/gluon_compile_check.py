"""Compile the grouped Gluon kernel (sparsify/kernels/grouped_gluon.py: the forward and grad_input) for a
Hopper GPU on a machine without one: Triton's front end, the Gluon layouts and PTX generation run as on the
GPU, so mistakes show before any device time is spent. With Triton's bundled ptxas and nvdisasm it also
prints registers, spills and the size of the entry loop in SASS (instructions, of them HGMMA): on the H200
the loop was issue-bound (benchmarks/NOTES.md), so fewer instructions an entry is the thing to win.

    python benchmarks/gluon_compile_check.py                        # the default designs, sm_90
    python benchmarks/gluon_compile_check.py --designs 64:4,64:2:BM=256,64:4:WS=1:IN_FLIGHT=2   # B:G[:key=value...]
    python benchmarks/gluon_compile_check.py --decode               # the Gluon decode kernel (decode_gluon.py)

A design leaves out what ``grouped_gluon.launch_config`` fills in, so this compiles what the launcher
would run. Exits 1 if any design fails to compile. The driver is replaced by a stand-in that names the
target, so run it in its own process (tests/test_gluon_compile.py does).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from grouped_kernels import parse_designs  # noqa: E402

DEFAULT = ("64:1:num_warps=4,64:4,64:4:STAGES=8:IN_FLIGHT=4,32:4:STAGES=8:IN_FLIGHT=3,128:2,16:4:STAGES=8,"
           "64:4:WS=1,64:2:WS=1:IN_FLIGHT=1,64:2:BM=256,64:1:BM=256,32:4:BM=256")


class TargetOnly:
    """What the JIT asks of a driver before launching: the device, the stream and the target."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_config(block: int, group: int, config: dict, transpose: bool):
    """The kernel compiled for 4096 -> 14336 at density 0.5 and 8192 tokens, the forward (``transpose``)
    or grad_input, with ``config`` completed as the launcher does (shapes on the CPU: nothing runs)."""
    from sparsify.kernels import grouped_gluon
    from sparsify.kernels.row_groups import forward_entries, grad_input_entries

    config = grouped_gluon.launch_config(block, group, 2, config)
    tokens, in_f, out_f, bm = 8192, 4096, 14336, config["BM"]
    rows, cols = out_f // block, in_f // block
    k = cols // 2
    col = torch.rand(rows, cols).argsort(dim=1)[:, :k].to(torch.int32)
    entries = (forward_entries if transpose else grad_input_entries)(col, cols, group)
    a = torch.empty(tokens, in_f if transpose else out_f, dtype=torch.bfloat16)
    y = torch.empty(tokens, out_f if transpose else in_f, dtype=torch.bfloat16)
    values = torch.empty(rows, k, block, block, dtype=torch.bfloat16)
    descriptors = grouped_gluon.descriptors(a, values, y, bm)
    bias = torch.empty(out_f, dtype=torch.bfloat16) if transpose else y
    kernel = grouped_gluon.KERNELS[bool(config["WS"])].warmup(
        *descriptors, entries.loads, entries.blocks, entries.mmas, entries.bounds, bias, tokens,
        y.shape[1] // block, entries.bounds.shape[0], B=block, G=group, BM=bm, STAGES=config["STAGES"],
        TRANSPOSE=transpose, HAS_BIAS=transpose, IN_FLIGHT=config["IN_FLIGHT"], BOX_BARRIERS=bool(config["BOX_BARRIERS"]),
        num_warps=config["num_warps"],
        grid=(1,),
    )
    return kernel, config


def entry_loop(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """The innermost loop holding the MMAs as (address, SASS text) pairs (NOPs left out: the static size
    of one entry's work, every target's branch included), and the addresses of its labels."""
    insts, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        inst = re.search(r"/\*([0-9a-f]{4,})\*/\s*(.*?);", line)
        if inst:
            insts.append((int(inst.group(1), 16), inst.group(2).strip()))
            labels.update({name: insts[-1][0] for name in pending})
            pending = []
    loops = []
    for address, text in insts:
        jump = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if jump and labels.get(jump.group(1), address + 1) < address:  # a backward branch closes a loop
            body = [(a, t) for a, t in insts if labels[jump.group(1)] <= a <= address and not t.startswith("NOP")]
            if any("HGMMA" in t for _, t in body):
                loops.append(body)
    body = min(loops, key=len)
    return body, {name: a for name, a in labels.items() if body[0][0] <= a <= body[-1][0]}


def _writes(text: str) -> tuple[set[str], bool]:
    """The uniform registers an instruction writes (its first operand; two for a .64 op) and whether
    it surely does (not under a predicate)."""
    predicated = text.startswith("@")
    opcode, _, operands = re.sub(r"^@!?U?P\w+\s+", "", text).partition(" ")
    match = re.fullmatch(r"UR(\d+)", operands.split(",")[0].strip())
    if not match or not (opcode.startswith("U") or opcode.startswith("R2UR")):
        return set(), False
    first = int(match.group(1))
    return {f"UR{first + i}" for i in range(2 if ".64" in opcode else 1)}, not predicated


def _successors(body: list[tuple[int, str]], labels: dict[str, int]) -> list[list[int]]:
    """Each instruction's successors inside the loop (by index); the closing branch goes back to the top."""
    index = {a: n for n, (a, _) in enumerate(body)}
    succ = []
    for n, (_, text) in enumerate(body):
        targets = [index[labels[t]] for t in re.findall(r"\.L_x_\d+", text) if t in labels]
        unconditional = re.match(r"(BRA|BRX)\b", text) is not None
        if n == len(body) - 1:  # the branch that closes the loop; falling through leaves it
            targets, unconditional = [0], True
        succ.append(targets if unconditional else targets + [n + 1])
    return succ


def _blocks(body: list[tuple[int, str]], labels: dict[str, int]) -> list[int]:
    """The basic block of each instruction (a new one at the loop's top, at every label and after every branch)."""
    starts = set(labels.values())
    block, out = 0, []
    for n, (address, text) in enumerate(body):
        if n and (address in starts or re.match(r"(@!?U?P\w+\s+)?(BRA|BRX)\b", body[n - 1][1])):
            block += 1
        out.append(block)
    return out


def stale_descriptors(body: list[tuple[int, str]], labels: dict[str, int]) -> list[str]:
    """HGMMAs whose shared-memory descriptors (the four uniform registers gdesc[URn] names) may come from
    another accumulator's branch: a reaching-definitions pass over the loop, where a write reaching an HGMMA
    from another basic block that holds HGMMAs is stale. ptxas 12.8 (Triton 3.6's) made that of two
    consecutive ``if target == t`` MMAs at G = 2, so the second target's MMAs read the block of the stage
    the first one last used (wrong sums that changed from run to run on the H200)."""
    block_of = _blocks(body, labels)
    mma_blocks = {block_of[n] for n, (_, text) in enumerate(body) if text.startswith("HGMMA")}
    succ = _successors(body, labels)
    writes = [_writes(text) for _, text in body]
    reach_in = [dict() for _ in body]  # register -> the instructions whose writes may reach here
    changed = True
    while changed:
        changed = False
        for n in range(len(body)):
            out = dict(reach_in[n])
            regs, sure = writes[n]
            for reg in regs:
                out[reg] = {n} if sure else out.get(reg, set()) | {n}
            for m in succ[n]:
                for reg, defs in out.items():
                    if not defs <= reach_in[m].get(reg, set()):
                        reach_in[m][reg] = reach_in[m].get(reg, set()) | defs
                        changed = True
    found = []
    for n, (_, text) in enumerate(body):
        desc = re.search(r"gdesc\[UR(\d+)\]", text)
        if desc:
            regs = [f"UR{int(desc.group(1)) + i}" for i in range(4)]
            stale = [r for r in regs if any(block_of[d] in mma_blocks and block_of[d] != block_of[n]
                                            for d in reach_in[n].get(r, ()))]
            if stale:
                found.append(f"{text} reads {', '.join(stale)} written in another branch")
    return found


def ptxas_report(kernel, capability: int) -> str:
    bin_dir = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin"
    if not (bin_dir / "ptxas").exists():
        return "(no bundled ptxas)"
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        pathlib.Path(ptx).write_text(kernel.asm["ptx"])
        done = subprocess.run([str(bin_dir / "ptxas"), "-v", "--gpu-name", f"sm_{capability}a", ptx, "-o", cubin],
                              capture_output=True, text=True)
        lines = [line.split(":", 1)[-1].strip() for line in done.stderr.splitlines()
                 if "registers" in line or "spill" in line or "wgmma" in line]
        if done.returncode or not (bin_dir / "nvdisasm").exists():
            return "; ".join(lines) or done.stderr.strip()[-300:]
        sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    body, labels = entry_loop(sass)
    stale = stale_descriptors(body, labels)
    if stale:
        raise RuntimeError("miscompiled MMA descriptors: " + "; ".join(stale[:3]))
    hgmma = sum("HGMMA" in t for _, t in body)
    syncs = sum(t.startswith("BAR.SYNC") for _, t in body)  # CTA-wide: each waits for the slowest warp
    return "; ".join(lines + [f"entry loop {len(body)} instructions, {hgmma} HGMMA, {syncs} BAR.SYNC"])


def compile_decode(block: int, in_f: int = 4096, out_f: int = 14336):
    """The Gluon decode kernel (decode_gluon.py) compiled for 16 tokens at density 0.5, as forward_decode
    would launch it (shapes on the CPU: nothing runs)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from sparsify.kernels import decode_gluon

    rows, cols = out_f // block, in_f // block
    k = cols // 2
    x, y = torch.empty(16, in_f, dtype=torch.bfloat16), torch.empty(16, out_f, dtype=torch.bfloat16)
    values = torch.empty(rows, k, block, block, dtype=torch.bfloat16)
    config = decode_gluon.decode_config(x, values)
    box = [config["S"] * block, block]
    desc = TensorDescriptor.from_tensor(values.view(rows * k * block, block), box,
                                        gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16))
    kernel = decode_gluon._decode_kernel.warmup(
        x, desc, torch.zeros(rows, k, dtype=torch.int32), y, 16, in_f, out_f, k, rows, 132, B=block, S=config["S"],
        STAGES=config["STAGES"], C_PAD=config["C_PAD"], PUBLIC_REINTERPRET=decode_gluon.PUBLIC_REINTERPRET,
        num_warps=block // 8, grid=(1,))
    return kernel, config


def _registers(kernel, capability: int) -> str:
    """ptxas's register and spill lines for a kernel (the decode kernel has no HGMMA loop to look at)."""
    bin_dir = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin"
    if not (bin_dir / "ptxas").exists():
        return "(no bundled ptxas)"
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "k.ptx")
        pathlib.Path(ptx).write_text(kernel.asm["ptx"])
        done = subprocess.run([str(bin_dir / "ptxas"), "-v", "--gpu-name", f"sm_{capability}a", ptx,
                               "-o", os.path.join(folder, "k.cubin")], capture_output=True, text=True)
    return "; ".join(line.split(":", 1)[-1].strip() for line in done.stderr.splitlines()
                     if "registers" in line or "spill" in line) or done.stderr.strip()[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", default=DEFAULT, help="B:G[:key=value...],...")
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--decode", action="store_true", help="the Gluon decode kernel (B = 16, 32) instead")
    args = parser.parse_args()
    driver.set_active(TargetOnly(args.capability))
    if args.decode:
        cases = [(f"decode B={block}", lambda block=block: _decode_case(block, args.capability)) for block in (16, 32)]
    else:
        cases = [(f"{product} B={block} G={group} {config}",
                  lambda b=block, g=group, c=config, t=transpose: _design_case(b, g, c, t, args.capability))
                 for block, group, config in parse_designs(args.designs)
                 for product, transpose in (("forward", True), ("grad_input", False))]
    failed = 0
    for name, case in cases:
        try:
            print(f"{name} {case()}", flush=True)
        except Exception as error:  # report every case, then fail
            failed += 1
            cause = error.__cause__ if error.__cause__ is not None else error
            print(f"{name}: FAILED {type(cause).__name__}: {str(cause)[-800:]}")
    print(f"triton {triton.__version__}: {failed} failed")
    return 1 if failed else 0


def _design_case(block: int, group: int, config: dict, transpose: bool, capability: int) -> str:
    kernel, resolved = compile_config(block, group, config, transpose)
    report = ptxas_report(kernel, capability)
    return f"-> {resolved}: OK, {kernel.metadata.shared} bytes of shared memory; {report}"


def _decode_case(block: int, capability: int) -> str:
    kernel, config = compile_decode(block)
    return (f"{config}: OK, {kernel.metadata.shared} bytes of shared memory; "
            f"{kernel.asm['ptx'].count('mma.sync')} mma.sync; {_registers(kernel, capability)}")

if __name__ == "__main__":
    sys.exit(main())
