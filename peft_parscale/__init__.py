"""ParScale (parallel scaling, arXiv 2505.10475) as a PEFT adapter for transformers causal LMs.

Importing this package registers the ``PARSCALE`` PEFT type, so that ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModelForCausalLM`` know it: import it before loading a ParScale adapter. PEFT has no plug-in discovery,
so without the import loading an adapter fails in PEFT with ``KeyError: 'PARSCALE'``.

The tuner core (``config``, ``layer``, ``model`` and the modules they use) never imports the workflows (``sft``,
``eval``, ``interop``, ...) beside it; docs/design.md has the module map.
"""

import warnings

from peft.utils import PeftType, register_peft_method

from .config import ParScaleConfig
from .layer import ParScaleAttention, ParScaleStreams
from .model import ParScaleModel
from .model_card import keep_card_on_push_to_hub
from .prefix_init import broadcast_prefixes, init_prefixes_from_text, init_prefixes_from_token_ids

__all__ = [
    "ParScaleAttention",
    "ParScaleConfig",
    "ParScaleModel",
    "ParScaleStreams",
    "broadcast_prefixes",
    "init_prefixes_from_text",
    "init_prefixes_from_token_ids",
]
__version__ = "0.1.0"


def _add_peft_type(name: str) -> None:
    # `register_peft_method` only accepts names that are already members of the `PeftType` enum, and PEFT has no
    # plugin mechanism for new ones, so the member is added here. An enum cannot be extended through its public API;
    # this writes the three tables an Enum class keeps (the same steps `enum` takes when it creates a member).
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to (re)assign members


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    _add_peft_type("PARSCALE")
    if PeftType.PARSCALE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="parscale", config_cls=ParScaleConfig, model_cls=ParScaleModel, prefix="parscale_")
    keep_card_on_push_to_hub()


_register()

# PEFT 0.21's PeftModel.__init__ (and TRL 1.16's model utilities) read `model.is_gradient_checkpointing`, which
# transformers 5.2x deprecated in favour of `is_activation_checkpointing`, so every get_peft_model and
# PeftModel.from_pretrained, of any PEFT method, warns about code the user did not write and cannot change. A filter
# cannot tell callers apart, so that one message of transformers' modeling_utils is silenced for every caller; every
# other warning still shows.
warnings.filterwarnings(
    "ignore",
    message="`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module="transformers.modeling_utils",
)
