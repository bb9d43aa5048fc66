"""What sparsify knows about Hugging Face models, in one place: the selection walk asks here.

- **Linears.** ``nn.Linear`` and GPT-2 style ``Conv1D`` (weight stored ``[in, out]``), recognized by
  class name so that transformers is never imported.
- **Naming.** A linear's layer index is the first all-digit name on its path: ``model.layers.N``
  (Llama, Mistral, Qwen, Phi), ``transformer.h.N`` (GPT-2, Falcon), ``model.decoder.layers.N`` (OPT),
  ``encoder.layer.N`` (BERT), ``encoder.block.N`` / ``decoder.block.N`` (T5). The names below it say
  the component: anything mentioning attention (``self_attn``, ``SelfAttention``, ``EncDecAttention``)
  is ``"attn"``; ``mlp``, ``ffn``, ``DenseReluDense`` (T5), ``intermediate`` / ``output`` (BERT) and
  the projections named in ``MLP_NAMES`` are ``"mlp"``; a mixture-of-experts router (``gate``) is not.
- **Weights other code reads.** A linear whose weight is also registered on another module (an
  ``lm_head`` tied to the embeddings) and ``nn.MultiheadAttention.out_proj`` (read as ``.weight`` by
  ``F.multi_head_attention_forward``) are left dense, with the reason.
- **Mixture of experts.** Experts stored as 3-D parameters of one module (Mixtral, Qwen-MoE in
  transformers 5) are not linears: sparsify cannot select them and says so.
"""

from __future__ import annotations

import re

import torch
from torch import nn

ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
MLP_NAMES = (
    "mlp", "ffn", "ffn_output", "feed_forward", "feedforward", "intermediate", "output", "block_sparse_moe",
    "moe", "expert", "experts", "shared_expert", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3",
    "DenseReluDense", "wi", "wi_0", "wi_1", "wo",
)
_MLP_NAME = re.compile("^(" + "|".join(MLP_NAMES) + ")$", re.IGNORECASE)
# A mixture-of-experts router is a linear inside the MLP block that chooses experts (Mixtral's
# ``block_sparse_moe.gate``, Qwen-MoE's ``shared_expert_gate``); it is no MLP projection.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_conv1d(module: nn.Module) -> bool:
    """HF GPT-2 style ``Conv1D``: a linear whose weight is stored ``[in, out]``."""
    return is_conv1d_type(type(module)) and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_conv1d_type(cls: type) -> bool:
    """The class of a GPT-2 style ``Conv1D`` (built as ``Conv1D(nf=out_features, nx=in_features)``)."""
    return cls.__name__ == "Conv1D" and issubclass(cls, nn.Module)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or ``Conv1D``: the modules sparsify can rewrite."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]``, whatever the module stores."""
    return module.weight.t() if is_conv1d(module) else module.weight


def component_of(local_name: str) -> str:
    """``"attn"`` if any name below the layer index mentions attention, else ``"mlp"`` if a name is an
    MLP's (and the linear is no router), else ``"other"``. Attention wins so that GPT-2's
    ``attn.c_proj`` is not an MLP."""
    parts = local_name.split(".")
    if any(ATTENTION_NAME.search(part) for part in parts):
        return "attn"
    if parts[-1] not in ROUTER_NAMES and any(_MLP_NAME.match(part) for part in parts):
        return "mlp"
    return "other"


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter) -> [(qualified parameter name, owning module), ...]`` over every path a module
    is registered under: a parameter with two distinct owners is tied."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((f"{fqn}.{name}" if fqn else name, module))
    return owners


def tied_to(module: nn.Module, owners: dict[int, list[tuple[str, nn.Module]]]) -> list[str]:
    """The parameters of *other* modules that share a parameter with ``module`` (sorted names), e.g.
    ``["model.embed_tokens.weight"]`` for a tied ``lm_head``; the same module at two paths is not tied."""
    names = set()
    for param in module._parameters.values():
        if param is not None:
            names.update(name for name, owner in owners.get(id(param), ()) if owner is not module)
    return sorted(names)


def weight_reader(parent: nn.Module, leaf: str) -> str | None:
    """Why ``parent.<leaf>`` must stay dense because ``parent`` reads its ``.weight`` itself, or None."""
    if isinstance(parent, nn.MultiheadAttention) and leaf == "out_proj":
        return "nn.MultiheadAttention reads out_proj.weight itself (F.multi_head_attention_forward), so a sparse out_proj would never run"
    return None


def moe_experts(model: nn.Module) -> list[tuple[str, str]]:
    """Mixture-of-experts modules sparsify cannot rewrite: ``[(qualified name, class name), ...]`` of
    every non-linear module named ``experts`` (or of a class ending in ``Experts``) that holds its
    experts' weights as 3-D parameters ``[experts, out, in]``."""
    found = []
    for fqn, module in model.named_modules():
        named_like = fqn.rsplit(".", 1)[-1] == "experts" or type(module).__name__.endswith("Experts")
        if named_like and not is_linear(module) and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            found.append((fqn, type(module).__name__))
    return found
