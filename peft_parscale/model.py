"""`ParScaleModel`: the PEFT tuner that puts ParScale on a transformers causal LM (see `layer.py` for the mechanism)."""

from __future__ import annotations

from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.masking_utils import create_masks_for_generate

from .adapter_file import check_adapter_file, expected_adapter_shapes
from .architecture import describe_architecture
from .config import VALUE_HEAD_DIM, ParScaleConfig, full_base_shape
from .layer import ParScaleAttention, ParScaleLayer, ParScaleStreams
from .prefix_init import config_token_ids, init_prefixes_from_token_ids


class ParScaleModel(BaseTuner):
    """Runs a frozen causal LM as P parallel streams with learned prefixes and a learned aggregator (ParScale).

    Created by `peft.get_peft_model` from a `ParScaleConfig`; not meant to be instantiated directly. Each attention
    module is wrapped in a `ParScaleAttention` (its prefixes) and the decoder gets a `ParScaleStreams` child (the
    aggregator, and the hooks that replicate inputs and aggregate outputs). Several adapters, possibly with different
    P, can live on one model; one is active at a time.

    Example:

        ```py
        >>> import peft_parscale  # registers the PARSCALE PEFT type
        >>> from peft import PeftModel, get_peft_model
        >>> from peft_parscale import ParScaleConfig
        >>> from transformers import AutoModelForCausalLM

        >>> base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
        >>> model = get_peft_model(base, ParScaleConfig(P=4), adapter_name="p4")
        >>> model.add_adapter("p8", ParScaleConfig(P=8))
        >>> model.set_adapter("p8")
        >>> with model.disable_adapter():  # the untouched base model
        ...     base_logits = model(input_ids).logits
        ```
    """

    prefix: str = "parscale_"
    tuner_layer_cls = ParScaleLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # ParScale finds its modules itself

    def _prepare_adapter_config(self, peft_config: ParScaleConfig, model_config: dict) -> ParScaleConfig:
        # Everything that can be wrong is checked here, before PEFT changes any module.
        architecture = describe_architecture(self.model)
        if peft_config.base_shape is None:
            peft_config.base_shape = dict(architecture.shape)
        built_for, this_model = full_base_shape(peft_config.base_shape), full_base_shape(architecture.shape)
        mismatched = [
            f"{name}={built_for[name]} (this model has {this_model[name]})"
            for name in this_model
            if built_for[name] != this_model[name]
        ]
        if mismatched:
            raise ValueError("This ParScale adapter was built for a base model with " + ", ".join(mismatched) + ".")
        table = architecture.position_table
        if table is not None and peft_config.prefix_length >= table:
            raise ValueError(
                f"This model looks its positions up in a table of {table}, with no negative positions: ParScale reads "
                f"a prefix at positions 0..T-1 and starts the real tokens at T, so prefix_length="
                f"{peft_config.prefix_length} leaves no position for them."
            )
        adapter_dir = getattr(peft_config, "adapter_dir", None)
        if adapter_dir is not None:
            check_adapter_file(adapter_dir, expected_adapter_shapes(architecture, peft_config))
        self.architecture = architecture
        # Read by PEFT's injection loop; not saved (a dataclass field would be): it follows from the base model.
        peft_config.target_modules = (architecture.decoder_name, *architecture.attention_names)
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # PEFT calls this for `get_peft_model`, `add_adapter` and `load_adapter` alike, so `prefix_init="text"` is
        # applied here. Its text is read and checked before PEFT changes anything; a loaded adapter (`adapter_dir`, set
        # by `ParScaleConfig.from_pretrained`) takes its weights from its file and is not initialised.
        config = self.peft_config[adapter_name]
        token_ids = None
        if config.prefix_init == "text" and getattr(config, "adapter_dir", None) is None:
            if low_cpu_mem_usage:
                raise ValueError("prefix_init='text' needs the adapter's weights: use low_cpu_mem_usage=False.")
            token_ids = config_token_ids(config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        if token_ids is not None:
            init_prefixes_from_token_ids(model, token_ids, adapter_name)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT strips the adapter name when it is the last or second-to-last part of a key; the aggregator's is
        # third-to-last (`parscale_aggregator.<adapter>.0.weight`), so it is stripped here, symmetrically for loading.
        aggregator = ".parscale_aggregator."
        if aggregator in key:
            return key.replace(f"{aggregator}{adapter_name}.", aggregator)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _check_target_module_exists(self, peft_config: ParScaleConfig, key: str) -> bool:
        return key == self.architecture.decoder_name or key in self.architecture.attention_names

    def _create_and_replace(
        self,
        peft_config: ParScaleConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        shape = full_base_shape(self.architecture.shape)
        prefix_sizes = (shape["num_key_value_heads"], shape["head_dim"], shape[VALUE_HEAD_DIM])
        if current_key == self.architecture.decoder_name:
            streams = getattr(target, "streams", None)
            if isinstance(streams, ParScaleStreams):
                streams.update_layer(adapter_name, peft_config)
            else:
                target.streams = ParScaleStreams(target, shape["hidden_size"], adapter_name, peft_config)
                target.streams.position_table = self.architecture.position_table
                self._route_generate_masks(target.streams)
        elif isinstance(target, ParScaleAttention):
            target.update_layer(adapter_name, peft_config, *prefix_sizes)
        else:
            index = self.architecture.attention_names.index(current_key)
            wrapped = ParScaleAttention(
                target,
                adapter_name,
                peft_config,
                *prefix_sizes,
                cache_argument=self.architecture.cache_arguments[index],
                sliding_window=self.architecture.sliding_layers[index],
            )
            self._replace_module(parent, target_name, wrapped, target)

    def _route_generate_masks(self, streams: ParScaleStreams) -> None:
        # With a static cache, `generate` builds the 4D attention masks itself, before the forward pass and its hooks,
        # through the model's `create_masks_for_generate`: the per-model override point transformers offers for it.
        # A bound method (not a closure), so that copies of the model (copy.deepcopy) route to their own streams.
        streams.original_masks_for_generate = getattr(
            self.model, "create_masks_for_generate", create_masks_for_generate
        )
        self.model.create_masks_for_generate = streams.masks_for_generate

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"ParScale runs one adapter at a time; got {names}.")
        super().set_adapter(names[0], inference_mode=inference_mode)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(_CANNOT_MERGE)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        raise ValueError(_CANNOT_MERGE)


_CANNOT_MERGE = (
    "A ParScale adapter cannot be merged into, or unloaded onto, the base weights: it changes how the model runs "
    "(P streams and an aggregator), not its weights. For the base model's outputs use `with model.disable_adapter():`; "
    "to keep the adapter, use `save_pretrained` and load it onto the base model again."
)
