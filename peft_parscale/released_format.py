"""The released ParScale format (``model_type`` ``qwen2_parscale``): its config fields and its tensor names.

What the format is, and how converting to and from this package's adapters works, is described in
`peft_parscale.interop`, which converts; this module says how the released config.json and tensor names map onto a
plain Qwen2 base and a `ParScaleConfig` adapter (`Qwen2Layout.released_to_adapter`).

Example:

    ```py
    >>> from peft_parscale.released_format import Qwen2Layout, base_config_of_released, released_adapter_config
    >>> adapter_config = released_adapter_config(released)          # released: a released checkpoint's config.json
    >>> layout = Qwen2Layout.from_config(base_config_of_released(released), "SRC")
    >>> layout.released_to_adapter(adapter_config)["model.layers.0.self_attn.prefix_k"][0]
    'base_model.model.model.layers.0.self_attn.parscale_prefix_k'
    ```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .adapter_file import check_tensor_shapes, expected_adapter_shapes
from .architecture import Architecture, describe_architecture
from .checkpoint_files import TensorInfo
from .config import ParScaleConfig

RELEASED_MODEL_TYPE = "qwen2_parscale"
RELEASED_ARCHITECTURES = ["Qwen2ParScaleForCausalLM"]
RELEASED_AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
    "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM",
}
# The authors' code, which `RELEASED_AUTO_MAP` names; copied into an export only when the user provides it.
MODELING_FILES = ("configuration_qwen2_parscale.py", "modeling_qwen2_parscale.py")
AGGREGATOR_PARTS = ("0.weight", "0.bias", "2.weight", "2.bias")


@dataclass(frozen=True)
class Qwen2Layout:
    """The tensors a Qwen2 model of a given config has, and where ParScale attaches to it.

    Built from a model on the meta device, so that the names, shapes and the checks of `describe_architecture`
    (supported attention) are transformers' and this package's own, at no memory cost. Sliding-window configurations
    are refused: the released checkpoints use none, and what the authors' code does with a window was not checked.
    """

    config: Qwen2Config
    architecture: Architecture
    backbone: dict[str, tuple[int, ...]]  # parameter -> shape; a tied lm_head is in `optional`
    optional: dict[str, tuple[int, ...]]

    @classmethod
    def from_config(cls, config: dict, role: str) -> Qwen2Layout:
        try:
            qwen2_config = Qwen2Config.from_dict(config)
            with torch.device("meta"):
                model = Qwen2ForCausalLM(qwen2_config)
            architecture = describe_architecture(model)
            if any(architecture.sliding_layers):
                raise ValueError(
                    "sliding-window layers (use_sliding_window=True): the released format has none, and how the "
                    "authors' code treats the prefix under a window is not known"
                )
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{role}: unsupported Qwen2 configuration: {error}") from error
        backbone = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
        # A tied LM head is the embedding; checkpoints may or may not store it.
        optional = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in backbone}
        return cls(model.config, architecture, backbone, optional)

    def released_to_adapter(self, adapter_config: ParScaleConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{released tensor name: (this package's adapter key, shape)} for an adapter with P > 1."""
        decoder = self.architecture.decoder_name
        names = {
            f"{attention}.prefix_{kind}": f"base_model.model.{attention}.parscale_prefix_{kind}"
            for attention in self.architecture.attention_names
            for kind in ("k", "v")
        }
        names.update(
            {
                f"{decoder}.aggregate_layer.{part}": f"base_model.model.{decoder}.streams.parscale_aggregator.{part}"
                for part in AGGREGATOR_PARTS
            }
        )
        expected = expected_adapter_shapes(self.architecture, adapter_config)
        if set(names.values()) != set(expected):  # the package's key names changed: this table must follow
            raise RuntimeError(f"Released-format names no longer cover the adapter's keys: {sorted(expected)}")
        return {released: (key, expected[key]) for released, key in names.items()}

    def check_backbone(self, tensors: dict[str, TensorInfo], role: str) -> None:
        """Raise `ValueError` unless `tensors` are exactly this model's backbone, with its shapes."""
        check_tensor_shapes({name: info.shape for name, info in tensors.items()}, self.backbone, role, self.optional)


def released_adapter_config(config: dict, role: str = "SRC") -> ParScaleConfig:
    """The ParScale adapter configuration of a released checkpoint's config.json; `ValueError` if it has none."""
    model_type = config.get("model_type")
    if model_type != RELEASED_MODEL_TYPE:
        raise ValueError(
            f"{role} is not a released ParScale checkpoint: its model_type is {model_type!r}, "
            f"not {RELEASED_MODEL_TYPE!r}."
        )
    missing = [name for name in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth") if name not in config]
    if missing:
        raise ValueError(f"{role}: config.json has model_type {RELEASED_MODEL_TYPE!r} but lacks {', '.join(missing)}.")
    if config["parscale_n"] == 1:
        raise ValueError(
            f"Nothing to import: {role} has parscale_n=1, and a P=1 qwen2_parscale checkpoint is a plain Qwen2 model "
            "(no prefixes, no aggregator). Load it as Qwen2: set model_type to 'qwen2' in its config.json."
        )
    try:
        return ParScaleConfig(
            P=config["parscale_n"],
            prefix_length=config["parscale_n_tokens"],
            smoothing=config["parscale_attn_smooth"],
            inference_mode=True,
        )
    except ValueError as error:
        raise ValueError(f"{role}: invalid ParScale fields in config.json: {error}") from error


def base_config_of_released(config: dict) -> dict:
    """The plain Qwen2 config.json of a released checkpoint's backbone: no ParScale fields, no remote code."""
    base = {key: value for key, value in config.items() if not key.startswith("parscale_") and key != "auto_map"}
    base.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return base


def released_config(base_config: dict, adapter_config: ParScaleConfig) -> dict:
    """config.json of the released format for a Qwen2 base config and an adapter."""
    config = dict(base_config)
    # The authors' code runs on transformers 4.x, which reads rope_theta / rope_scaling / torch_dtype; configs saved by
    # transformers 5 name them rope_parameters / dtype, and the old config class would fall back to its defaults.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    config.update(
        model_type=RELEASED_MODEL_TYPE,
        architectures=list(RELEASED_ARCHITECTURES),
        auto_map=dict(RELEASED_AUTO_MAP),
        parscale_n=adapter_config.P,
        parscale_n_tokens=adapter_config.prefix_length,
        parscale_attn_smooth=adapter_config.smoothing,
    )
    return config


def plain_qwen2_config(config: dict, role: str) -> dict:
    model_type = config.get("model_type")
    if model_type == RELEASED_MODEL_TYPE:
        raise ValueError(f"{role} is a released qwen2_parscale checkpoint; a plain Qwen2 checkpoint is needed here.")
    if model_type != "qwen2":
        raise ValueError(f"The released ParScale format is Qwen2-only; {role} has model_type {model_type!r}.")
    return config
