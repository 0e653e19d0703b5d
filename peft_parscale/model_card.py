"""The ParScale part of an adapter's model card (README.md): metadata, what the adapter is, and how to load it.

PEFT writes the card in ``PeftModel.create_or_update_model_card``, which has no hook for a method's own content, and
TRL rewrites README.md from its template whenever a trainer creates its card. So this section is merged into
whatever card is there (between two HTML comments, replaced on every save) by ``ParScaleConfig.save_pretrained``,
which PEFT calls on every ``save_pretrained``/``push_to_hub``, by ``peft_parscale.sft.ParScaleSFTTrainer`` after TRL
has written its card, and, for ``PeftModel.push_to_hub``, by ``keep_card_on_push_to_hub`` (see there).
"""

from __future__ import annotations

import os
import re

from huggingface_hub import ModelCard, ModelCardData

SECTION_START = "<!-- parscale:start -->"
SECTION_END = "<!-- parscale:end -->"
TAGS = ("parscale", "peft")


def trainable_parameters(config) -> int | None:
    """Number of weights a ParScale adapter adds, from its config (``None`` before ``base_shape`` is known)."""
    shape = config.base_shape
    if shape is None:
        return None
    prefixes = shape["num_hidden_layers"] * config.P * shape["num_key_value_heads"] * config.prefix_length
    # keys and values; the values' size is recorded where it differs (config.VALUE_HEAD_DIM: this module cannot import
    # config, which imports it)
    prefixes *= shape["head_dim"] + shape.get("value_head_dim", shape["head_dim"])
    hidden = shape["hidden_size"]
    # Linear(P·H → H) and Linear(H → P), both with bias; a single stream needs no aggregator
    aggregator = (config.P * hidden * hidden + hidden + hidden * config.P + config.P) if config.P > 1 else 0
    return prefixes + aggregator


def card_section(config) -> str:
    base = config.base_model_name_or_path or "BASE_MODEL_ID"
    count = trainable_parameters(config)
    parameters = f"{count:,}" if count is not None else "unknown"
    return f"""{SECTION_START}
## ParScale adapter

A [ParScale](https://arxiv.org/abs/2505.10475) (parallel scaling) adapter for `{base}`, made with `peft_parscale`.
The frozen base model runs as **P = {config.P}** parallel streams; each stream has its own **{config.prefix_length}**
learned prefix key/value vectors in every attention layer, and a learned aggregator mixes the {config.P} outputs of
each token with dynamic weights (smoothing ε = {config.smoothing}). Only these weights are stored here.

| streams P | prefix length T | smoothing ε | adapter parameters |
| --- | --- | --- | --- |
| {config.P} | {config.prefix_length} | {config.smoothing} | {parameters} |

```python
import peft_parscale  # registers the ParScale adapter type with PEFT: import it before loading
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter = "path/to/this/adapter"  # this repository's id on the Hub, or its local directory
base = AutoModelForCausalLM.from_pretrained("{base}")
tokenizer = AutoTokenizer.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, adapter)
inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```
{SECTION_END}"""


def update_model_card(directory: str | os.PathLike, config) -> None:
    """Merge the ParScale metadata and section into ``directory/README.md``, creating the card if there is none."""
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    card.data.tags = sorted(set(card.data.tags or []) | set(TAGS))
    # The Hub's `base_model` field takes repository ids; PEFT writes local paths there too, which the Hub rejects.
    base = config.base_model_name_or_path
    if base and not os.path.isdir(base):
        card.data.base_model = base
    elif card.data.base_model and os.path.isdir(str(card.data.base_model)):
        card.data.base_model = None
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), re.DOTALL)
    # First in the card, under its title: the generic snippets PEFT's and TRL's templates add further down do not
    # import peft_parscale, so they cannot load this adapter
    title, _, body = pattern.sub("", card.text).strip().partition("\n")
    if not title.startswith("# "):
        title, body = "", f"{title}\n{body}"
    card.text = f"{title}\n\n{card_section(config)}\n\n{body.strip()}\n".lstrip()
    card.save(path)


def keep_card_on_push_to_hub() -> None:
    """Make ``PeftModel.push_to_hub`` upload the adapter's card rather than transformers' template.

    ``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it saves the adapter (which writes the
    card PEFT and this package build) and then overwrites README.md with the Hub repository's card or a generic
    template, for every PEFT method. No public hook sits between that overwrite and the upload; the private
    ``_upload_modified_files`` is the one step that does, so for ParScale adapters PEFT's card and the ParScale
    section are merged back there. ``tests/test_push_to_hub.py`` records a real push and fails if this stops working.
    """
    from peft import PeftModel

    upload = PeftModel._upload_modified_files
    if getattr(upload, "keeps_parscale_card", False):
        return

    def upload_with_card(self, working_dir, *args, **kwargs):
        config = self.peft_config.get(self.active_adapter) if isinstance(self.active_adapter, str) else None
        if getattr(config, "peft_type", None) == "PARSCALE":  # by type name: config.py imports this module
            self.create_or_update_model_card(working_dir)
            update_model_card(working_dir, config)
        return upload(self, working_dir, *args, **kwargs)

    upload_with_card.keeps_parscale_card = True
    PeftModel._upload_modified_files = upload_with_card
