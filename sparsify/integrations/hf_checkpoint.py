"""Sparse HF checkpoints: ``save_pretrained`` / ``from_pretrained`` keep the model block-sparse.

    model = sparsify(AutoModelForCausalLM.from_pretrained(name), components="mlp", density=0.5)
    model.save_pretrained(d)                          # values, col_indices, bias in model.safetensors;
                                                      # config.json: quantization_config.quant_method "sparsify"
    model = AutoModelForCausalLM.from_pretrained(d)   # (after `import sparsify`) sparse again, same topology

transformers rebuilds non-``nn.Linear`` modules through its quantizer registry; that is the
extension point used here. ``config.json`` carries a ``quantization_config`` that names every
sparse module and the :class:`BlockSparseConfig` it was made with (:func:`record_sparsity` writes
it). On load, :class:`SparsifyHfQuantizer` rewrites those modules of the meta-device skeleton into
``BlockSparseLinear`` layers of the right shapes before the weights are read, so the checkpoint's
``values`` / ``col_indices`` land in them. After loading nothing of the quantizer stays on the model
(no ``hf_quantizer``, ``is_quantized`` is False): it behaves like a model sparsified by hand, with
``.half()``, the Trainer and ``densify`` working as usual.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from sparsify import block_ell
from sparsify.config import BlockSparseConfig
from sparsify.layer import BlockSparseLinear, guard_state_dict_loads, sparse_layers
from sparsify.select import is_linear, linear_weight, replace_submodule

log = logging.getLogger(__name__)

QUANT_METHOD = "sparsify"
FORMAT_VERSION = 1


class SparsifyQuantizationConfig(QuantizationConfigMixin):
    """What ``config.json`` says about a sparse model: ``modules`` maps each sparse module's qualified
    name to its ``BlockSparseConfig.to_dict()``. Everything else (the topology, the values) is in the
    weights file."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"SparsifyQuantizationConfig: quant_method={quant_method!r}, expected {QUANT_METHOD!r}")
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(
                f"SparsifyQuantizationConfig: format_version {format_version!r} is newer than this library reads "
                f"({FORMAT_VERSION}); upgrade sparsify to load this model"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = {name: BlockSparseConfig.from_dict(cfg).to_dict() for name, cfg in (modules or {}).items()}

    def layer_configs(self) -> dict[str, BlockSparseConfig]:
        return {name: BlockSparseConfig.from_dict(cfg) for name, cfg in self.modules.items()}


class SparsifyHfQuantizer(HfQuantizer):
    """Rebuilds the sparse modules named in ``quantization_config`` before the weights load."""

    requires_calibration = False  # validate_environment says what to do instead, in our words

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError(
                "from_pretrained(..., quantization_config=SparsifyQuantizationConfig(...)) on a dense checkpoint is "
                "not supported: load the dense model, then call sparsify(model, ...) (topology needs the weights)"
            )

    def _process_model_before_weight_loading(self, model, **kwargs):
        for recorded, config in self.quantization_config.layer_configs().items():
            name, module = _find_module(model, recorded)
            if isinstance(module, BlockSparseLinear):
                continue  # the model's own code already builds it sparse
            if not is_linear(module):
                raise ValueError(f"{name}: config.json names this module as block-sparse but it is a {type(module).__name__}")
            sparse = BlockSparseLinear.from_linear(module, config=config, weight=linear_weight(module), name=name)
            replace_submodule(model, name, sparse)
        _teach_init_weights(model)
        # Some transformers releases (5.17) skip their shape check for every tensor once a quantizer is
        # active and load a mismatched tensor as it is: remember the shapes to check after loading.
        self.expected_shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        expected = getattr(self, "expected_shapes", {})
        wrong = [f"{name} {tuple(t.shape)} (expected {expected[name]})"
                 for name, t in model.state_dict(keep_vars=True).items() if name in expected and tuple(t.shape) != expected[name]]
        if wrong:
            raise ValueError(
                f"checkpoint tensors of the wrong shape: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; this "
                "transformers release loads them unchecked when a quantization_config is present, so sparsify refuses "
                "the model (ignore_mismatched_sizes needs transformers >= 5.24 with a sparse checkpoint)"
            )
        for name, layer in sparse_layers(model):
            block_ell.check_col_indices(layer.col_indices, layer.num_cols, name)
            layer.stats_probe.zero_()  # non-persistent, so never in the checkpoint
        for module in model.modules():
            module.__dict__.pop("_init_weights", None)
        _detach_quantizer(model)
        record_sparsity(model)
        guard_state_dict_loads(model)  # as sparsify() does: a later load_state_dict checks before copying
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _find_module(model, name: str):
    # Names are recorded relative to the model sparsify() was given; sparsify(model.model) shares its
    # config with the task model around it, so a name may lack the base-model prefix ("model.").
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, f"{prefix}.{name}" if prefix else None):
        if candidate is None:
            continue
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            pass
    raise ValueError(
        f"{name}: config.json names this module as block-sparse but {type(model).__name__} has no such "
        "module; the checkpoint belongs to another architecture or config"
    )


def _teach_init_weights(model) -> None:
    # transformers gives every tensor missing from the checkpoint (and the non-persistent stats_probe)
    # uninitialized memory, then runs the model's _init_weights on the modules not fully loaded,
    # children first. That function does not know BlockSparseLinear, and a parent's init may read
    # the layer's .weight (GPT-2's reads mlp.c_proj.weight), which needs a valid topology: so each
    # PreTrainedModel's _init_weights is wrapped, for the load only, to reset such layers first.
    from transformers import PreTrainedModel

    names = {id(module): name for name, module in model.named_modules()}
    for owner in model.modules():
        if not isinstance(owner, PreTrainedModel):
            continue

        def init_weights(module, _original=owner._init_weights):
            if not isinstance(module, BlockSparseLinear):
                return _original(module)
            if not all(getattr(t, "_is_hf_initialized", False) for t in (module.values, module.col_indices)):
                log.warning("%s: values or col_indices missing from the checkpoint; initialized as a fresh layer",
                            names.get(id(module), "BlockSparseLinear"))
                module.reset_parameters()
            module.stats_probe.zero_()

        owner._init_weights = init_weights


def _detach_quantizer(model) -> None:
    # transformers treats a model with an hf_quantizer as quantized (no .half(), Trainer checks,
    # attention dtype tweaks in some models keyed on config._is_quantized); a sparse model is not.
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and "_is_quantized" in config.__dict__:
            del config._is_quantized


def record_sparsity(model) -> None:
    """Write ``model.config.quantization_config`` from the model's current BlockSparseLinear layers (or
    remove it when none are left), so that ``save_pretrained`` stores how the model was sparsified.
    ``sparsify()`` and ``densify()`` call it; a no-op for models without an HF config."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return
    modules = {name: layer.config.to_dict() for name, layer in sparse_layers(model)}
    if modules:
        check_not_quantized(model)
        config.quantization_config = SparsifyQuantizationConfig(modules).to_dict()
    elif _is_ours(getattr(config, "quantization_config", None)):
        del config.quantization_config


def check_not_quantized(model) -> None:
    """Raise a ValueError if transformers quantized ``model`` (its config has another
    ``quantization_config``): the checkpoint could not say both. ``sparsify()`` calls it before
    rewriting anything, so the refusal leaves the model unchanged."""
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None and not _is_ours(existing):
        raise ValueError(
            f"{type(model).__name__}: the model is quantized by transformers ({_method_of(existing)!r}); "
            "block-sparse layers cannot be combined with it: load the model unquantized, then sparsify it"
        )


def _method_of(quantization_config) -> Any:
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method")
    return getattr(quantization_config, "quant_method", None)


def _is_ours(quantization_config) -> bool:
    return quantization_config is not None and _method_of(quantization_config) == QUANT_METHOD


def register() -> None:
    """Make transformers' ``from_pretrained`` understand ``quant_method: "sparsify"``; runs on import,
    safe to call again."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparsifyQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparsifyHfQuantizer)


register()
