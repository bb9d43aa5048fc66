"""The kernel options: every switch of the kernels, in one frozen dataclass.

    from sparsify import kernel_options
    with kernel_options(backend="reference"):      # tests, benchmarks, experiments
        y = layer(x)

Process-wide defaults come from environment variables, read once (at the first call that needs them)
and validated; nothing reads the environment on the per-call path (``TRITON_INTERPRET`` too is read
once: Triton itself reads it at import). ``kernel_options(...)`` overrides fields inside a ``with``
block (and restores them after); ``set_kernel_options(...)`` changes the process-wide defaults.
What each option decides: ``dispatch.py``.

| field         | values                  | environment variable         | what it does |
|---------------|-------------------------|------------------------------|--------------|
| backend       | auto, reference, triton | SPARSIFY_BACKEND             | auto: Triton on CUDA tensors, the PyTorch reference elsewhere; triton on CPU tensors needs TRITON_INTERPRET=1 |
| block_kernel  | auto, gather, tile, dense | SPARSIFY_BLOCK_KERNEL      | large-token kernels for small blocks: per-slot gather, masked-dense tiles, or the dense weight and cuBLAS (dense: at every block size; auto: the thresholds in dispatch.py) |
| tma           | auto, on, off, persistent, ws | SPARSIFY_TMA (auto/on/off/1/0/persistent/ws) | the tensor-descriptor kernels on Hopper: auto where measured faster (dispatch.TMA_MIN_BLOCK), on every one from B = 64; persistent: as auto, the forward tuned among its persistent configs (one program an SM; slower where timed); ws: as auto, each TMA kernel tuned among its plain and warp-specialized configs (16-bit operands; not yet timed) |
| lean_launch   | True, False             | SPARSIFY_LEAN_LAUNCH (1/0)   | relaunch compiled Triton kernels without the JIT's Python argument binding |
| check_columns | True, False             | SPARSIFY_CHECK_COLUMNS (1/0) | Triton forward: a device-side assert that every column index is in [0, C) (no host sync) |
| grouped       | auto, off, on, ws       | SPARSIFY_GROUPED             | the grouped Gluon kernels (forward, grad_input; Hopper, bf16 / fp16, many tokens): auto where measured faster (dispatch.GROUPED_DESIGNS: B = 32, 64), off, on (every block size), ws (their warp-specialized variant) |
| split_reduce  | launch, fused           | SPARSIFY_SPLIT_REDUCE        | a split forward's float32 partials (decode): summed by a second launch, or by the last program of each output tile inside the kernel (the same bits, one launch fewer; not yet timed on a GPU) |

Boolean variables also accept true/false and on/off; values are case-insensitive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Mapping

BACKENDS = ("auto", "reference", "triton")
BLOCK_KERNELS = ("auto", "gather", "tile", "dense")
TMA_CHOICES = ("auto", "on", "off", "persistent", "ws")
GROUPED_CHOICES = ("auto", "off", "on", "ws")
SPLIT_REDUCE_CHOICES = ("launch", "fused")

_ENV = {
    "backend": "SPARSIFY_BACKEND",
    "block_kernel": "SPARSIFY_BLOCK_KERNEL",
    "tma": "SPARSIFY_TMA",
    "lean_launch": "SPARSIFY_LEAN_LAUNCH",
    "check_columns": "SPARSIFY_CHECK_COLUMNS",
    "grouped": "SPARSIFY_GROUPED",
    "split_reduce": "SPARSIFY_SPLIT_REDUCE",
}
_FLAGS = ("lean_launch", "check_columns")
_TMA_ENV = {"auto": "auto", "1": "on", "on": "on", "0": "off", "off": "off", "persistent": "persistent", "ws": "ws"}
_BOOL_ENV = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    backend: str = "auto"
    block_kernel: str = "auto"
    tma: str = "auto"
    lean_launch: bool = True
    check_columns: bool = True
    grouped: str = "auto"
    split_reduce: str = "launch"

    def __post_init__(self) -> None:
        for name, allowed in (("backend", BACKENDS), ("block_kernel", BLOCK_KERNELS), ("tma", TMA_CHOICES),
                              ("grouped", GROUPED_CHOICES), ("split_reduce", SPLIT_REDUCE_CHOICES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"kernel option {name}={value!r} is not one of {allowed}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"kernel option {name}={getattr(self, name)!r} must be True or False")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "KernelOptions":
        """The defaults the environment asks for; an unknown value is an error naming the variable."""
        fields: dict = {}
        for name, variable in _ENV.items():
            raw = environ.get(variable)
            if raw is None or not raw.strip():
                continue
            value = raw.strip().lower()
            try:
                if name == "tma":
                    fields[name] = _TMA_ENV[value]
                elif name in _FLAGS:
                    fields[name] = _BOOL_ENV[value]
                else:
                    fields[name] = value
                    cls(**{name: value})
            except (KeyError, ValueError):
                allowed = {"backend": BACKENDS, "block_kernel": BLOCK_KERNELS, "tma": tuple(_TMA_ENV),
                           "lean_launch": tuple(_BOOL_ENV), "check_columns": tuple(_BOOL_ENV),
                           "grouped": GROUPED_CHOICES, "split_reduce": SPLIT_REDUCE_CHOICES}[name]
                raise ValueError(
                    f"{variable}={raw!r} is not one of {allowed}; unset it or pick one of those"
                ) from None
        return cls(**fields)


_lock = threading.Lock()
_current: KernelOptions | None = None


def options() -> KernelOptions:
    """The options in force (the environment's defaults until something overrides them)."""
    current = _current
    if current is None:
        return _load_defaults()
    return current


def _load_defaults() -> KernelOptions:
    global _current
    with _lock:
        if _current is None:
            _current = KernelOptions.from_env()
        return _current


def set_kernel_options(**fields) -> KernelOptions:
    """Change the process-wide options (unnamed fields keep their values); returns the new options."""
    global _current
    new = dataclasses.replace(options(), **fields)
    with _lock:
        _current = new
    return new


@contextlib.contextmanager
def kernel_options(**fields) -> Iterator[KernelOptions]:
    """Override fields inside a ``with`` block; the previous options come back on exit."""
    global _current
    previous = options()
    new = dataclasses.replace(previous, **fields)  # validates before anything changes
    with _lock:
        _current = new
    try:
        yield new
    finally:
        with _lock:
            _current = previous


@functools.cache
def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, read once: Triton reads it at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
