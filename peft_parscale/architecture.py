"""Architecture discovery: where ParScale attaches in a transformers causal LM, or why it cannot.

`describe_architecture` reads the model's structure (no module is looked up by a fixed name), finds the decoder, its
layers, each layer's attention module and cache argument, and the dimensions the adapter's tensors depend on, and
refuses what ParScale does not support with a `ValueError` naming the cause (docs/design.md, "Finding the pieces").
`ParScaleModel` calls it before PEFT changes any module; this is the code that grows with every new architecture.

Example:

    ```py
    >>> from peft_parscale.architecture import describe_architecture
    >>> architecture = describe_architecture(AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B"))
    >>> architecture.attention_names[0], architecture.cache_arguments[0]
    ('model.layers.0.self_attn', 'past_key_values')
    ```
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .config import VALUE_HEAD_DIM
from .layer import ParScaleAttention
from .probe import Probe, probe_decoder

SUPPORTED_ATTENTION = ("eager", "sdpa", "flex_attention")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# How transformers' attention modules hand their post-rotary keys/values to the KV cache and attend to what it returns:
# `<cache>.update(<keys>, <values>, self.layer_idx[, ...])`, on one line. ParScale's prefix goes in at that call.
_CACHE_UPDATE = re.compile(r"\.update\(.*\bself\.layer_idx\b")
# The names transformers gives an attention module's cache argument, for a forward without type annotations.
_CACHE_ARGUMENT_NAMES = ("past_key_values", "layer_past", "past_key_value")


@dataclass(frozen=True)
class Architecture:
    """Where ParScale attaches in a model, and the dimensions its tensors depend on.

    decoder_name: the decoder (`get_decoder()`), e.g. `model` or `transformer`.
    attention_names: each layer's attention module, in layer order, e.g. `transformer.h.0.attn`.
    shape: the dimensions the adapter's tensors depend on (`BASE_SHAPE_FIELDS`, and `VALUE_HEAD_DIM` where the cached
        values differ in size from the keys).
    cache_arguments: per attention module, the name of its cache argument (`past_key_values`, `layer_past`).
    sliding_layers: per attention module, whether it is a sliding-window layer.
    position_table: the length of the table the model looks its positions up in (learned, as in GPT-2, or fixed
        rotary angles, as in CodeGen and GPT-J), which has no negative positions; None where positions are computed.
    """

    decoder_name: str
    attention_names: tuple[str, ...]
    shape: dict[str, int]
    cache_arguments: tuple[str, ...] = ()
    sliding_layers: tuple[bool, ...] = ()
    position_table: int | None = None


def _writes_keys_to_cache(module: nn.Module) -> bool:
    """Whether `module` is an attention module that passes its keys/values through the cache's `update` with its
    own layer index (read from the source of its class's `forward`)."""
    return isinstance(getattr(module, "layer_idx", None), int) and _forward_updates_cache(type(module))


@functools.cache
def _forward_updates_cache(module_class: type) -> bool:
    # Once per class: every module of a model is checked, and reading a source file costs about a millisecond.
    try:
        source = inspect.getsource(module_class.forward)
    except (OSError, TypeError, AttributeError):  # no module, or no source to check
        return False
    return _CACHE_UPDATE.search(source) is not None


def _attention_modules(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name within `layer`, module) of each attention module of one decoder layer; a wrapped module is named by its
    `ParScaleAttention` wrapper."""
    found, wrapped = [], []
    for name, module in layer.named_modules():
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue  # inside a wrapper: the wrapped module was checked through it
        base = module
        if isinstance(module, ParScaleAttention):
            wrapped.append(name)
            base = module.get_base_layer()
        if _writes_keys_to_cache(base):
            found.append((name, base))
    return found


def _cache_argument(parameters: Mapping[str, inspect.Parameter]) -> str | None:
    """The name of the argument through which an attention module's forward (its `parameters`) receives the KV cache:
    the one annotated as a `Cache`, else the name transformers uses for it."""
    for name, parameter in parameters.items():
        annotation = parameter.annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "") or str(annotation)
        if re.search(r"\bCache\b", str(text)):
            return name
    return next((name for name in _CACHE_ARGUMENT_NAMES if name in parameters), None)


def _cached_shape(model_name: str, probe: Probe) -> dict[str, int]:
    """The prefix's dimensions (`BASE_SHAPE_FIELDS` but the layer count and hidden size, and `VALUE_HEAD_DIM` where it
    differs from `head_dim`) from what every attention layer passed to `cache.update`, or `ValueError`."""
    if len(set(probe.key_shapes)) != 1 or len(set(probe.value_shapes)) != 1:
        raise ValueError(
            f"ParScale gives every layer a prefix of one shape; the attention layers of {model_name} cache keys of "
            f"(heads, size) {sorted(set(probe.key_shapes))} and values of {sorted(set(probe.value_shapes))}."
        )
    (key_heads, key_size), (value_heads, value_size) = probe.key_shapes[0], probe.value_shapes[0]
    if key_heads != value_heads:
        raise ValueError(
            f"ParScale needs the keys and values an attention layer caches to have the same number of heads; "
            f"{model_name} caches {key_heads} key heads and {value_heads} value heads."
        )
    shape = {"num_key_value_heads": key_heads, "head_dim": key_size}
    if value_size != key_size:  # latent attention: a compressed latent and the keys' rotary part (DeepSeek-V2/V3)
        shape[VALUE_HEAD_DIM] = value_size
    return shape


def _layer_types(config, num_layers: int) -> list[str]:
    """Each layer's attention type, as transformers' caches and masks decide it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * num_layers
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * num_layers
    return ["full_attention"] * num_layers


def _uses_alibi(config, parameters: Mapping[str, inspect.Parameter]) -> bool:
    """ALiBi: Falcon with `alibi=True`, MPT (`attn_config.alibi`), BLOOM (an `alibi` argument of the attention's
    forward, its `parameters`, with no switch)."""
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False):
        return True
    return "alibi" in parameters and not hasattr(config, "alibi")


def describe_architecture(model: nn.Module) -> Architecture:
    """Find the decoder, its layers, their attention modules and cache arguments from the model's structure, or raise
    `ValueError` naming what is unsupported.

    The decoder is `model.get_decoder()`. Its layer list is the child `ModuleList` in which every layer has exactly
    one attention module, found as the module that passes its keys/values through the KV cache
    (`<cache>.update(keys, values, self.layer_idx)`, the point where ParScale adds its prefix). Its cache argument is
    the forward argument annotated as a `Cache` (`past_key_values` in Llama-style models, `layer_past` in GPT-NeoX,
    Falcon and GPT-BigCode). The prefix's shape, and whether the model looks its positions up in a table, come from
    one forward pass of the decoder over one token (`probe.probe_decoder`).
    """
    config = getattr(model, "config", None)
    model_name = type(model).__name__
    if config is None:
        raise ValueError(
            f"ParScale supports transformers causal LMs (AutoModelForCausalLM); {model_name} has no config."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"ParScale supports decoder-only causal LMs; {model_name} is an encoder-decoder model, whose decoder also "
            "attends to the encoder's outputs: there the prefix has no self-attention cache to live in."
        )
    text_config = config.get_text_config(decoder=True)
    if getattr(text_config, "add_cross_attention", False):
        raise ValueError(
            f"ParScale supports decoder-only causal LMs; this {model_name} has cross-attention layers "
            "(add_cross_attention=True) that attend to an encoder's outputs."
        )
    if not getattr(text_config, "is_causal", True):
        raise ValueError(f"ParScale needs causal attention; this {model_name} is configured with is_causal=False.")
    implementation = text_config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"ParScale supports attn_implementation in {SUPPORTED_ATTENTION}, not {implementation!r}: load the model "
            f"with attn_implementation='sdpa'."
        )
    names = {module: name for name, module in model.named_modules()}
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if decoder is None or not names.get(decoder):
        # get_decoder() is a best-effort lookup (it returns the model itself for some, e.g. Llama4ForCausalLM): take
        # the one child that holds a list of layers instead.
        children = [
            child
            for child in model.children()
            if any(isinstance(grandchild, nn.ModuleList) for grandchild in child.children())
        ]
        decoder = children[0] if len(children) == 1 else None
    if decoder is None:
        raise ValueError(f"ParScale needs a causal LM whose get_decoder() is a submodule; {model_name} has none.")

    # The layer list: the decoder's ModuleList in which every layer has exactly one attention module.
    layer_lists = [(name, child) for name, child in decoder.named_children() if isinstance(child, nn.ModuleList)]
    problem = f"{model_name}'s decoder ({type(decoder).__name__}) has no list of layers"
    layers_name, attentions = None, None
    for name, layers in layer_lists:
        found = [_attention_modules(layer) for layer in layers]
        if layers and all(len(modules) == 1 for modules in found):
            layers_name, attentions = name, [modules[0] for modules in found]
            break
        bad = next((index for index, modules in enumerate(found) if len(modules) != 1), None)
        if bad is not None:
            modules = found[bad]
            what = "none" if not modules else f"{len(modules)} ({', '.join(name for name, _ in modules)})"
            problem = f"layer {bad} of {model_name} ({type(layers[bad]).__name__}) has {what}"
    if attentions is None:
        raise ValueError(
            "ParScale needs one attention module per decoder layer that passes its post-rotary keys/values through "
            f"the KV cache (`cache.update(keys, values, self.layer_idx)`), where the prefix is added; {problem}."
        )

    decoder_name = names[decoder]
    attention_names, cache_arguments = [], []
    for index, (name, attention) in enumerate(attentions):
        parameters = inspect.signature(attention.forward).parameters
        if _uses_alibi(text_config, parameters):
            raise ValueError(
                f"{model_name} uses ALiBi position biases, which ParScale does not support: the model adds them to the "
                "attention scores of its real keys itself, so the prefix keys would get none, or the wrong ones. "
                "Rotary and learned absolute positions are supported."
            )
        cache_argument = _cache_argument(parameters)
        if cache_argument is None or "attention_mask" not in parameters:
            raise ValueError(
                f"ParScale needs attention modules that take the KV cache and an `attention_mask` as arguments; "
                f"{type(attention).__name__} (layer {index} of {model_name}) takes {list(parameters)}."
            )
        attention_names.append(f"{decoder_name}.{layers_name}.{index}.{name}")
        cache_arguments.append(cache_argument)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        raise ValueError(
            f"ParScale needs a decoder that takes `position_ids` (the real tokens' positions must not count the "
            f"prefix); {type(decoder).__name__}.forward does not."
        )

    layer_types = _layer_types(text_config, len(attentions))
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported or len(layer_types) != len(attentions):
        raise ValueError(
            f"ParScale supports full and sliding-window attention layers; this {model_name} has {unsupported or layer_types} "
            "layers."
        )
    # What the layers cache, and whether positions index a table, are seen in one forward pass (`probe.py`).
    probe = probe_decoder(decoder, [attention.layer_idx for _, attention in attentions])
    shape = {"num_hidden_layers": len(attentions), "hidden_size": text_config.hidden_size}
    shape.update(_cached_shape(model_name, probe))
    return Architecture(
        decoder_name,
        tuple(attention_names),
        shape,
        tuple(cache_arguments),
        tuple(layer_type == "sliding_attention" for layer_type in layer_types),
        probe.position_table,
    )
