"""Host synchronizations of the topology optimizer, counted on the CPU.

On a GPU, reading a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, an
op whose output size depends on the data such as ``nonzero``, a blocking host-to-device copy) waits
for every queued kernel. :class:`HostSyncCounter` counts those events without a GPU: tensors that
would live on the accelerator (the model's parameters, gradients, buffers and optimizer state, the
topology statistics, and everything computed from them or created with an explicit ``device=``) are
tracked through ``__torch_dispatch__``; tensors the code makes on the host on purpose (generator
draws, decision records) are not. It also counts the kernels launched on device tensors, leaving out
those of the wrapped optimizer's own step.

    with HostSyncCounter(model, opt) as count:
        opt.step()
    count.syncs, count.launches, count.events
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, sparsify

aten = torch.ops.aten

# outputs whose size depends on the values: the host must read them first
_DATA_DEPENDENT = {
    aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
}
# ops that only make a new view of existing memory: no kernel
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided", "t",
    "transpose", "permute", "detach", "alias", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "lift_fresh", "_reshape_alias", "flatten", "view_as", "unflatten", "diagonal", "set_", "empty", "empty_like",
    "empty_strided",
}
_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "randperm", "tensor", "eye",
              "linspace", "as_tensor")
SYNC_KINDS = ("scalar read", "device-to-host copy", "data-dependent size", "blocking host-to-device copy")


class HostSyncCounter(TorchDispatchMode):
    """Counts host synchronizations a GPU run would have (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, opt=None) -> None:
        super().__init__()
        self.events: Counter = Counter()
        self.launches = 0
        self._device: dict[int, weakref.ref] = {}
        self._roots = (model, opt)
        self._patched = {}
        self._explicit_device = False  # the factory being called was given device=
        self._paused = False  # inside the wrapped optimizer's own step: not the topology's cost

    @property
    def syncs(self) -> int:
        return sum(self.events[k] for k in SYNC_KINDS)

    # -- which tensors live on the device --------------------------------------------------------
    def _mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._device[id(t)] = weakref.ref(t)

    def on_device(self, t) -> bool:
        ref = self._device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _seed(self) -> None:
        model, opt = self._roots
        for t in list(model.parameters()) + list(model.buffers()):
            self._mark(t)
            self._mark(t.grad)
        if opt is not None:
            for state in opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor) and t.dim() > 0:  # AdamW's step counter stays on the host
                        self._mark(t)
            seen: set[int] = set()
            self._walk({k: v for k, v in vars(opt).items() if k not in ("optimizer", "layers")}, seen)

    def _walk(self, obj, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self._mark(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                self._walk(v, seen)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self._walk(v, seen)
        elif type(obj).__module__.startswith("sparsify") and hasattr(obj, "__dict__"):
            self._walk(vars(obj), seen)

    # -- the counting ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device = any(self.on_device(t) for t in inputs) or (not inputs and self._explicit_device)
        if device and not self._paused:
            if func is aten._local_scalar_dense.default:
                self.events["scalar read"] += 1
            elif func in _DATA_DEPENDENT or (
                func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
                and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
            ):
                self.events["data-dependent size"] += 1
        out = func(*args, **kwargs)
        if device:
            if not self._paused and func.overloadpacket.__name__.rstrip("_") not in _NO_KERNEL and func is not aten._local_scalar_dense.default:
                self.launches += 1
            for t in tree_flatten(out)[0]:
                self._mark(t)
        return out

    def __enter__(self):
        self._seed()
        counter = self
        originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy", "to")}
        self._patched = originals

        def reader(name):
            def read(t, *a, **k):
                if counter.on_device(t):
                    counter.events["device-to-host copy"] += 1
                    t = t.detach().clone()  # the host copy is a host tensor
                    counter._device.pop(id(t))
                return originals[name](t, *a, **k)
            return read

        def to(t, *a, **k):
            moves = any(isinstance(x, (str, torch.device)) for x in a) or "device" in k
            if moves and not counter.on_device(t):
                counter.events["async host-to-device copy" if k.get("non_blocking") else "blocking host-to-device copy"] += 1
                out = originals["to"](t.clone(), *a, **k)
                counter._mark(out)
                return out
            return originals["to"](t, *a, **k)

        def factory(fn):  # the dispatcher always sees a device; only the call site tells an explicit one
            def make(*a, **k):
                outer, counter._explicit_device = counter._explicit_device, k.get("device") is not None
                try:
                    return fn(*a, **k)
                finally:
                    counter._explicit_device = outer
            return make

        opt = self._roots[1]
        if opt is not None and hasattr(opt, "optimizer"):
            inner_step = opt.optimizer.step

            def step(*a, **k):
                counter._paused = True
                try:
                    return inner_step(*a, **k)
                finally:
                    counter._paused = False
            opt.optimizer.step = step

        for name in ("cpu", "tolist", "numpy"):
            setattr(torch.Tensor, name, reader(name))
        torch.Tensor.to = to
        self._factories = {name: getattr(torch, name) for name in _FACTORIES}
        for name, fn in self._factories.items():
            setattr(torch, name, factory(fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._patched.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in self._factories.items():
            setattr(torch, name, fn)
        opt = self._roots[1]
        if opt is not None and "step" in vars(getattr(opt, "optimizer", object())):
            del opt.optimizer.step
        return super().__exit__(*exc)


# -- the optimizer's budget ----------------------------------------------------------------------
def _model(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)


def count_steps(model, opt, steps: int) -> list[HostSyncCounter]:
    """Train ``steps`` steps, counting inside every ``opt.step()``."""
    data = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        with HostSyncCounter(model, opt) as count:
            opt.step()
        opt.zero_grad()
        counts.append(count)
    return counts


def test_the_counter_sees_host_reads_of_device_values():
    model = _model(1)
    layer = model.model.layers[0].mlp.up_proj
    with HostSyncCounter(model) as count:
        host = torch.ones(3)
        float(host.sum()), host.tolist()  # host tensors: free
        bool(layer.values.sum() > 0)
        layer.col_indices.tolist()
        layer.values[layer.values > 0]
        torch.zeros(3).to(layer.values.device)
    assert count.events == {"scalar read": 1, "device-to-host copy": 1, "data-dependent size": 1,
                            "blocking host-to-device copy": 1}


def test_a_step_without_a_decision_makes_no_host_synchronization():
    for scorer in ("gradient", "magnitude"):
        model = _model()
        opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                                TopologyConfig(score_every=2, update_every=100, scorer=scorer))
        counts = count_steps(model, opt, 4)  # Level 0 every step, Level 1 at steps 2 and 4
        assert [c.syncs for c in counts] == [0, 0, 0, 0], (scorer, [dict(c.events) for c in counts])


def test_a_decision_synchronizes_once_for_all_layers():
    for layers in (1, 3):
        model = _model(layers)
        opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                                TopologyConfig(score_every=1, update_every=2, prune_fraction=0.5, swap_threshold=1.0,
                                               epsilon=0.2))
        counts = count_steps(model, opt, 4)
        assert sum(d.num_swaps for d in opt.history) > 0
        decisions = [c for step, c in enumerate(counts, 1) if step % 2 == 0]
        assert [c.syncs for c in decisions] == [1, 1], (layers, [dict(c.events) for c in decisions])


def test_after_consolidate_steps_stay_free_of_syncs_and_a_decision_still_synchronizes_once():
    model = _model(2)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                            TopologyConfig(score_every=1, update_every=3, prune_fraction=0.5, swap_threshold=1.0,
                                           consolidate_keep=0.3, consolidate_lr_scale=0.5, consolidate_release=0.2))
    count_steps(model, opt, 3)
    opt.consolidate()  # a host read once per task, off the step path
    assert all(s.any_record for s in opt.layer_scores.values())  # so step 6 ranks by specificity
    counts = count_steps(model, opt, 3)  # steps 4, 5 (kept slots scaled, released ranked first), 6 decides
    assert [c.syncs for c in counts] == [0, 0, 1], [dict(c.events) for c in counts]
