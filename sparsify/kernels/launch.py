"""A lean relaunch path for the Triton kernels: after the first launch of a kernel for a given argument
specialization (through Triton's autotuner and JIT, which choose, compile and launch it), later launches
call the compiled kernel's launcher directly.

Why: every ``kernel[grid](...)`` call re-runs, in Python, the autotuner's key building, the JIT's
argument binding and specialization, its cache lookup and launch metadata, tens of microseconds per
launch on the H100 machine's host, several launches per layer call (benchmarks/NOTES.md). Here a
relaunch costs one dict lookup on a key that mirrors what Triton specializes on (tensor dtype and
16-byte alignment, integer divisibility by 16, == 1 and width), plus the C launcher call.

Used only where it is exactly equivalent: on CUDA, not under the interpreter, with no launch hooks
installed (profilers), for kernels none of whose configs has a pre-hook (the TMA kernels: their pre-hooks
set the descriptors' box shapes on every launch, and descriptors are no cache key).
``kernel_options(lean_launch=False)`` (or ``SPARSIFY_LEAN_LAUNCH=0``) turns it off.
The launcher arguments (grid, stream, function, packed metadata, launch metadata, enter / exit hooks,
then every kernel argument constexprs included, in signature order) are the same in Triton 3.6 and 3.9.
"""

from __future__ import annotations

import torch
import triton

from sparsify.kernels.dispatch import interpreting, options

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: no lean path
    _knobs = None

_COMPILED: dict = {}


def _installed(hook) -> bool:
    """Triton 3.6 / 3.9 keep launch hooks in a ``HookChain`` (empty: none installed); older ones use None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def enabled() -> bool:
    if _knobs is None or interpreting() or not options().lean_launch:
        return False
    runtime = _knobs.runtime
    return not _installed(runtime.launch_enter_hook) and not _installed(runtime.launch_exit_hook)


def _specs(args: tuple, exact: tuple) -> tuple:
    """The cache key of the runtime arguments: what Triton's specialization distinguishes (a tensor's
    dtype and 16-byte alignment; an integer's divisibility by 16, == 1 and width), and the exact value
    of arguments Triton does specialize on (``exact``: integer shapes, which also pick the autotuner's
    config) and of non-integers. One comprehension, no call per argument: it runs on every launch."""
    return tuple([
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else a if e or a.__class__ is not int
        else (a % 16 == 0, a == 1, -(2**31) <= a < 2**31)
        for a, e in zip(args, exact)
    ])


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


_EXACT: dict = {}  # id(kernel) -> per parameter: keyed by value (False for do_not_specialize ones)
_HOOKED: dict = {}  # id(kernel) -> whether any of its configs has a pre-hook


def _pre_hooked(kernel) -> bool:
    hooked = _HOOKED.get(id(kernel))
    if hooked is None:
        configs = getattr(kernel, "configs", None) or [getattr(kernel, "best_config", None)]
        hooked = _HOOKED[id(kernel)] = any(c is not None and c.pre_hook is not None for c in configs)
    return hooked


def _exact_flags(kernel) -> tuple:
    flags = _EXACT.get(id(kernel))
    if flags is None:
        flags = _EXACT[id(kernel)] = tuple(not p.do_not_specialize for p in _jit_function(kernel).params)
    return flags


def launch(kernel, grid, args: tuple, constexprs: dict, device: torch.device) -> None:
    """``kernel[grid](*args, **constexprs)`` (kernel: a JITFunction or an Autotuner over one); ``grid``
    a tuple or a function of the kernel's meta-parameters. ``args`` are the runtime arguments in
    signature order, ``constexprs`` the remaining ones by name."""
    if device.type != "cuda" or not enabled() or _pre_hooked(kernel):
        kernel[grid](*args, **constexprs)
        return
    key = (id(kernel), device.index, _specs(args, _exact_flags(kernel)), tuple(constexprs.items()))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs)
        config = getattr(kernel, "best_config", None)
        if compiled is None or (config is not None and config.pre_hook is not None):  # a pruner's fallback
            return
        meta = {**constexprs, **(config.all_kwargs() if config is not None else {})}
        tail = tuple(meta[name] for name in _jit_function(kernel).arg_names[len(args):])
        _COMPILED[key] = (compiled, meta, tail)
        return
    compiled, meta, tail = entry
    g = grid(meta) if callable(grid) else grid
    stream = torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())
    compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)


def launch_tile(kernel, grid, args: tuple, constexprs: dict, device: torch.device, config: dict | None) -> None:
    """Launch ``kernel`` (an Autotuner) autotuned through ``launch`` or, where ``config`` is given (tests
    and the GPU check: a tile the autotuner might not pick), with that tile: its meta-parameters plus
    optional "num_warps" / "num_stages" (default 4 / 2), through the JIT function under the autotuner.
    ``grid`` is a function of the meta-parameters."""
    if config is None:
        launch(kernel, grid, args, constexprs, device)
        return
    tile = {name: value for name, value in config.items() if name not in ("num_warps", "num_stages")}
    kernel.fn[grid(tile)](
        *args, **constexprs, **tile, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2)
    )
