"""The arms of the experiment and what each changes: the optimizer, a penalty, protected slots.

    dense            every linear dense
    ewc              dense + elastic weight consolidation (diagonal Fisher from task A)
    static-0.5       sparse MLPs, topology frozen (plain AdamW)
    dynamic-D        sparse MLPs at density D, TopologyOptimizer during A and B
    dynamic-0.5-b64  the same with 64x64 blocks
    protected-0.5    upper bound: at the end of A, the half of each row's slots that mattered most for A
                     (optimal-brain-damage saliency) are frozen for B (TopologyOptimizer.protect)
    anchored-0.5     the variant: the same half is never pruned but keeps learning at 0.1x the rate
    consolidated-0.5 the method built for task boundaries: TopologyOptimizer.consolidate() at the start of B, on
                     the block statistics task A left (the most important blocks kept and slowed, the least
                     important released for B), then dynamic B
    finetune-0.5     the dynamic-0.5 task-A model densified (zero blocks become trainable weights), then dense B
    ewc-0.5          the dynamic-0.5 task-A model, topology frozen, EWC on its block values (dense EWC's lambda)
    replay-R         dense + a fraction R of B's training sequences drawn from task A (R = 0.01, 0.1)
    lora             dense task-A model frozen, LoRA adapters (peft) on every linear layer and the output head, at the rank whose
                     parameters equal the sparse arms' trainable block values, learning rate 10x the grid's

Every sparse arm but dynamic-0.25/0.75 and the 64x64 one starts B from the dynamic-0.5 task-A model when the
static arm shares it (``paired_arms``): each seed then has two task-A models, dense and sparse, and every B
arm starts from one of them, so arms are compared within a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify import TopologyConfig, TopologyOptimizer, sparse_layers


@dataclass(frozen=True)
class Arm:
    name: str
    density: float | None = None  # None: dense
    block_size: int = 16
    dynamic: bool = False
    ewc: bool = False
    protect: str | None = None  # "freeze" | "anchor"
    a_dynamic: bool = False  # train task A with the TopologyOptimizer even if B is static
    anchor_rate: float = 0.1  # learning-rate factor of anchored slots
    densify: bool = False  # B trains the densified task-A model
    replay: float = 0.0  # fraction of B's training sequences taken from task A
    lora_density: float | None = None  # B trains LoRA adapters (frozen model) sized like sparse arms at this density
    lr_scale: float = 1.0  # B's learning rates are the grid's times this
    consolidate: bool = False  # TopologyOptimizer.consolidate() on task A's statistics before B

    @property
    def a_key(self) -> str:
        """Arms with the same task-A training share one task-A run."""
        if self.density is None:
            return "dense"
        kind = "dynamic" if self.dynamic or self.a_dynamic else "static"
        return f"{kind}-{self.density}" + ("" if self.block_size == 16 else f"-b{self.block_size}")


def make_arms(density: float = 0.5, densities=(0.25, 0.5, 0.75), big_block: int = 64,
              static_shares_a: bool = False, baselines: bool = False) -> dict[str, Arm]:
    """Every arm of the grid by name; ``density`` is the one of the static, protected and variant arms.
    ``static_shares_a``: the static arm starts B from the dynamic arm's task-A model and freezes the
    topology for B only (one task-A run fewer; B then differs from dynamic-D in the topology alone).
    ``baselines``: also replay, LoRA, the densified sparse model and EWC on the sparse model."""
    arms = [Arm("dense"), Arm("ewc", ewc=True), Arm(f"static-{density}", density=density, a_dynamic=static_shares_a)]
    arms += [Arm(f"dynamic-{d}", density=d, dynamic=True) for d in densities]
    if big_block:
        arms.append(Arm(f"dynamic-{density}-b{big_block}", density=density, block_size=big_block, dynamic=True))
    arms.append(Arm(f"protected-{density}", density=density, dynamic=True, protect="freeze"))
    arms.append(Arm(f"anchored-{density}", density=density, dynamic=True, protect="anchor"))
    if baselines:
        arms += [Arm(f"consolidated-{density}", density=density, dynamic=True, consolidate=True),
                 Arm(f"finetune-{density}", density=density, a_dynamic=True, densify=True),
                 Arm(f"ewc-{density}", density=density, a_dynamic=True, ewc=True),
                 Arm("replay-0.01", replay=0.01), Arm("replay-0.1", replay=0.1), Arm("lora", lora_density=density, lr_scale=10.0)]
    return {arm.name: arm for arm in arms}


def paired_arms(density: float = 0.5) -> dict[str, Arm]:
    """The paired design: per seed one dense and one sparse (dynamic, ``density``, 16x16 blocks) task-A
    model, every B arm starting from one of them; the baselines included."""
    return make_arms(density, densities=(density,), big_block=0, static_shares_a=True, baselines=True)


def make_optimizer(model, arm: Arm, lr: float, topo: TopologyConfig):
    """AdamW (no weight decay, so frozen slots stay frozen), wrapped by the TopologyOptimizer if dynamic."""
    fused = next(model.parameters()).is_cuda  # one kernel for the whole update
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    adamw = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), fused=fused)
    return TopologyOptimizer(adamw, model, topo) if arm.dynamic else adamw


# ---------------------------------------------------------------- EWC
def fisher_diagonal(model, batches) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over mini-batches of the squared gradient of the task-A loss."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    count = 0
    for loss_fn in batches:
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: f / max(1, count) for n, f in fisher.items()}


class EWCPenalty:
    """``lam * sum_i F_i (theta_i - theta*_i)^2 / N`` with F normalized to mean 1 (lam is then scale-free)."""

    def __init__(self, model, fisher: dict[str, torch.Tensor], lam: float) -> None:
        params = dict(model.named_parameters())
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
        self.params = [params[n] for n in fisher]
        self.root_f = [(f / mean).sqrt() for f in fisher.values()]  # sum F d^2 = sum ||sqrt(F) d||^2
        self.anchors = [params[n].detach().clone() for n in fisher]
        self.count = sum(f.numel() for f in fisher.values())
        self.lam = lam

    def __call__(self) -> torch.Tensor:
        # foreach ops: a handful of kernels for all parameters instead of four per parameter
        weighted = torch._foreach_mul(torch._foreach_sub(self.params, self.anchors), self.root_f)
        return self.lam * torch.stack(torch._foreach_norm(weighted)).pow(2).sum() / self.count


# ---------------------------------------------------------------- protected task-A blocks
def block_saliency(model, batches) -> dict[str, torch.Tensor]:
    """Optimal-brain-damage saliency of every active block for task A: ``sum (w * g)^2`` over the
    block's weights, averaged over mini-batches, ``{layer: [R, K]}``: the loss increase (to second
    order, diagonal Fisher) if the block were removed."""
    layers = sparse_layers(model)
    saliency = {n: torch.zeros(l.values.shape[:2], device=l.values.device) for n, l in layers}
    count = 0
    for loss_fn in batches:
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        for n, layer in layers:
            saliency[n] += (layer.values.detach() * layer.values.grad).pow(2).sum(dim=(2, 3))
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: s / max(1, count) for n, s in saliency.items()}


def top_half(saliency: torch.Tensor) -> torch.Tensor:
    """The ``ceil(K / 2)`` most salient slots of every row: bool ``[R, K]``."""
    k = saliency.shape[1]
    keep = saliency.topk((k + 1) // 2, dim=1).indices
    return torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, keep, True)


class Anchor:
    """The variant: anchored slots are protected only at Level 2 steps (so never pruned) and learn at
    ``rate`` times the others' rate at every other step (their update is scaled after the step)."""

    def __init__(self, opt: TopologyOptimizer, masks: dict[str, torch.Tensor], rate: float) -> None:
        self.opt, self.masks, self.rate = opt, masks, rate
        self.layers = {n: opt.layers[n] for n in masks}
        self.saved: dict[str, torch.Tensor] = {}
        self.decision = False

    def before_step(self) -> None:
        # protect() reads the mask back to the host (a sync): set it only around Level 2 steps
        self.decision = (self.opt.global_step + 1) % self.opt.config.update_every == 0
        for name, mask in self.masks.items():
            if self.decision:
                self.opt.protect(name, mask)
            self.saved[name] = self.layers[name].values.detach().clone()

    @torch.no_grad()
    def after_step(self) -> None:
        for name, mask in self.masks.items():
            values, old = self.layers[name].values, self.saved[name]
            damped = old + self.rate * (values - old)
            values.copy_(torch.where(mask[:, :, None, None], damped, values))
            if self.decision:
                self.opt.protect(name, None)
