"""Configuration of a ParScale adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType, TaskType

from .model_card import update_model_card

# The base-model dimensions an adapter's tensors depend on; recorded in the adapter so that loading it onto a
# different base fails with a message naming the dimension, before anything is changed.
BASE_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_key_value_heads", "head_dim")
# Recorded too where the values an attention layer caches differ in size from its keys (head_dim): latent attention
# (DeepSeek-V2/V3) caches a compressed latent as its "keys" and their rotary part as its "values". Absent, it is head_dim,
# so adapters saved before it existed load unchanged.
VALUE_HEAD_DIM = "value_head_dim"
PREFIX_INITS = ("random", "text")


def full_base_shape(base_shape: dict[str, int]) -> dict[str, int]:
    """`base_shape` with `VALUE_HEAD_DIM` filled in (head_dim where it is not recorded)."""
    return {VALUE_HEAD_DIM: base_shape["head_dim"], **base_shape}


def check_prefix_texts(texts: Any, num_streams: int) -> None:
    """Raise `ValueError` unless `texts` is a list (or tuple) of exactly `num_streams` strings, one per stream."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or len(texts) != num_streams:
        raise ValueError(f"Prefix texts must be a list of P={num_streams} strings, one per stream, got {texts!r:.80}.")
    if not all(isinstance(text, str) for text in texts):
        raise ValueError(f"Prefix texts must be strings, got {[type(text).__name__ for text in texts]}.")


@dataclass
class ParScaleConfig(PeftConfig):
    """Configuration of a ParScale adapter (parallel scaling, arXiv 2505.10475).

    The frozen model runs as ``P`` parallel streams. Each stream has its own ``prefix_length`` learned key/value
    vectors in every attention layer, and an aggregator mixes the ``P`` final hidden states of each token with
    dynamic weights. Only the prefixes and the aggregator are trained.

    Args:
        P: Number of parallel streams. ``P=1`` is the prefix-only baseline (no aggregator).
        prefix_length: Number of prefix key/value vectors per stream and layer (``T`` in the paper; 48 in the
            released checkpoints).
        smoothing: Label-smoothing of the aggregation weights, ``w <- w * (1 - smoothing) + smoothing / P``.
            Default 0.1: the paper's aggregation ablation found it best, and so did this package's recycling ablation
            at P=4 (against 0.01; RESULTS.md). The released checkpoints use 0.01.
        init_std: Standard deviation of the normal initialisation of the prefix keys and values (with
            ``prefix_init="random"``) and of the aggregator's first layer. The aggregator's output layer starts at
            zero, so a fresh adapter averages its streams uniformly; random prefixes alone make the streams differ
            (paper, Appendix A).
        prefix_init: How a new adapter's prefixes start. ``"random"``: normal with std ``init_std``. ``"text"``:
            stream p's prefix in every layer is the frozen model's own post-rotary keys/values of the first
            ``prefix_length - 1`` tokens of ``prefix_init_text[p]`` and a document boundary (the tokenizer's BOS, or
            EOS, token), computed at positions -T..-1, so a fresh ``P=1`` adapter is exactly the base model having
            read that text first (see ``prefix_init.py``). Like PEFT's
            ``PromptTuningInit.TEXT``. ``ParScaleSFTTrainer`` and ``parscale sft`` take the texts from the training
            data when ``prefix_init_text`` is not given; ``get_peft_model`` needs them. ``"text"`` trains to a lower
            loss at every learning rate tried (RESULTS.md) and is what ``parscale sft``, the recipes and the
            quickstart use; the field's default stays ``"random"`` because a config alone has no text to read, as
            with PEFT's ``PromptTuningConfig``.
        prefix_init_text: With ``prefix_init="text"``: ``P`` texts, one per stream, each at least
            ``prefix_length - 1`` tokens long (tokenised without special tokens).
        tokenizer_name_or_path: The tokenizer of ``prefix_init_text`` (loaded with ``AutoTokenizer``).
        base_shape: Dimensions of the base model the adapter was built for, filled in when the adapter is created.
            Loading the adapter onto a model with other dimensions raises a ``ValueError`` naming them.

    Example:

        ```py
        >>> import peft_parscale  # registers the PARSCALE PEFT type
        >>> from peft import get_peft_model
        >>> from peft_parscale import ParScaleConfig
        >>> model = get_peft_model(base_model, ParScaleConfig(P=8))
        >>> model.print_trainable_parameters()

        >>> # prefixes that start as the base model's keys/values of two real texts
        >>> config = ParScaleConfig(
        ...     P=2, prefix_init="text", prefix_init_text=[text_a, text_b], tokenizer_name_or_path="Qwen/Qwen2.5-0.5B"
        ... )
        >>> model = get_peft_model(base_model, config)
        ```
    """

    P: int = field(default=8, metadata={"help": "Number of parallel streams."})
    prefix_length: int = field(default=48, metadata={"help": "Prefix key/value vectors per stream and layer (T)."})
    smoothing: float = field(default=0.1, metadata={"help": "Smoothing of the aggregation weights, in [0, 1)."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal initialisation of new weights."})
    # The initialisation new adapters get by default; this is the one place to change it.
    prefix_init: str = field(
        default="random",
        metadata={
            "help": "How new prefixes start: random, or the base model's keys/values of real text.",
            "choices": PREFIX_INITS,
        },
    )
    prefix_init_text: list[str] | None = field(
        default=None, metadata={"help": "With prefix_init=text: P texts, one per stream (default: training data)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The tokenizer of prefix_init_text (AutoTokenizer.from_pretrained)."}
    )
    base_shape: dict[str, int] | None = field(
        default=None, metadata={"help": "Dimensions of the base model (filled in when the adapter is created)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PARSCALE
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        if self.task_type != TaskType.CAUSAL_LM:
            raise ValueError(f"ParScale adapts causal language models; got task_type={self.task_type!r}.")
        if isinstance(self.P, bool) or not isinstance(self.P, int) or self.P < 1:
            raise ValueError(f"P (number of streams) must be an integer >= 1, got {self.P!r}.")
        if isinstance(self.prefix_length, bool) or not isinstance(self.prefix_length, int) or self.prefix_length < 1:
            raise ValueError(f"prefix_length must be an integer >= 1, got {self.prefix_length!r}.")
        if not isinstance(self.smoothing, (int, float)) or not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be a number in [0, 1), got {self.smoothing!r}.")
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0.0:
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}.")
        if self.prefix_init not in PREFIX_INITS:
            raise ValueError(f"prefix_init must be one of {PREFIX_INITS}, got {self.prefix_init!r}.")
        if self.prefix_init_text is not None:
            if self.prefix_init != "text":
                raise ValueError(f"prefix_init_text is only used with prefix_init='text', not {self.prefix_init!r}.")
            check_prefix_texts(self.prefix_init_text, self.P)
            if self.tokenizer_name_or_path is None:
                raise ValueError("prefix_init_text needs tokenizer_name_or_path, the tokenizer to read it with.")
        elif self.tokenizer_name_or_path is not None:
            raise ValueError("tokenizer_name_or_path is only used to tokenise prefix_init_text, which is not given.")
        if self.base_shape is not None and set(self.base_shape) - {VALUE_HEAD_DIM} != set(BASE_SHAPE_FIELDS):
            raise ValueError(
                f"base_shape must have exactly the keys {BASE_SHAPE_FIELDS} (and optionally {VALUE_HEAD_DIM!r}), got "
                f"{sorted(self.base_shape)}."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        # Remembered (not serialised) so the weights can be checked before PEFT injects anything: PEFT creates the
        # adapter first and reads its file afterwards, which would leave a half-loaded adapter behind on a bad file.
        config.adapter_dir = directory if os.path.isdir(directory) else None
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        # PEFT calls this on every save_pretrained/push_to_hub, after it has written its own model card: the one
        # place where a method can add to that card (see model_card.py)
        update_model_card(save_directory, self)
