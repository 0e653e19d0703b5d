"""Start an adapter's prefixes from the frozen model's own keys and values of real text (``prefix_init="text"``).

Random prefixes (``prefix_init="random"``) make a fresh adapter worse than the base model: every stream attends to T
keys/values the model has never produced. Instead, stream p's prefix in every layer can be the base model's own
post-rotary keys/values of a real T-token text, computed at positions -T..-1. The rotary embedding is relative, so
the real tokens (positions 0, 1, ...) then see exactly what they would see had the model read the text just before
them: a fresh P=1 adapter *is* the base model reading that text first, and a fresh P>1 adapter, whose zero
aggregator output layer weighs the streams uniformly, averages the final hidden states of P such runs. A model that
looks its positions up in a table (GPT-2, CodeGen, GPT-J) has no negative positions: there the text is read at
0..T-1, and ParScale starts the real tokens at T (`ParScaleStreams.first_position`), which is exact in the same way.
A text read from a tokenizer ends with a document boundary (`document_boundary`): its first T - 1 tokens, then the
tokenizer's BOS (or EOS) token, so that the input reads as a new document rather than as the text's continuation.

This is PEFT's ``PromptTuningInit.TEXT`` one step further: prompt tuning starts its virtual tokens from a text's
input embeddings; ParScale's prefixes live in every layer, so they start from the text's keys/values in every layer.

Example::

    import peft_parscale
    from peft import get_peft_model
    from peft_parscale import ParScaleConfig, init_prefixes_from_text

    model = get_peft_model(base_model, ParScaleConfig(P=2, prefix_length=48))
    init_prefixes_from_text(model, tokenizer, [first_text, second_text])   # each at least 48 tokens

or equivalently, when the adapter is created::

    config = ParScaleConfig(P=2, prefix_init="text", prefix_init_text=[first_text, second_text],
                            tokenizer_name_or_path="Qwen/Qwen2.5-0.5B")
    model = get_peft_model(base_model, config)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from .config import ParScaleConfig, check_prefix_texts
from .layer import ParScaleStreams
from .probe import base_model_only


def init_prefixes_from_text(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], adapter_name: str | None = None
) -> None:
    """Set every prefix of an adapter to the frozen model's keys/values of real text: stream p reads `texts[p]`.

    Each text is tokenised with ``tokenizer(text, add_special_tokens=False)``; stream p reads its first T − 1 tokens
    (T: ``prefix_length``), then a document boundary (`document_boundary`), so that the input after the prefix reads
    as the start of a new document. `texts` must hold exactly P strings of at least T − 1 tokens each; otherwise a
    `ValueError` is raised and nothing changes. Only the named adapter (default: the active one) changes; the
    aggregator is left as it is.

    Args:
        model: A model with ParScale adapters (a `PeftModel`, or the model PEFT injected them into).
        tokenizer: The base model's tokenizer.
        texts: One text per stream.
        adapter_name: The adapter to initialise; default: the active one.

    Example::

        model = get_peft_model(base_model, ParScaleConfig(P=2, prefix_length=48))
        init_prefixes_from_text(model, tokenizer, [first_text, second_text])
    """
    streams, adapter_name = _find_adapter(model, adapter_name)
    token_ids = _text_token_ids(
        tokenizer, texts, streams.num_streams[adapter_name], streams.prefix_length[adapter_name]
    )
    init_prefixes_from_token_ids(model, token_ids, adapter_name)


def init_prefixes_from_token_ids(
    model: nn.Module, token_ids: Sequence[Sequence[int]] | torch.Tensor, adapter_name: str | None = None
) -> None:
    """`init_prefixes_from_text` for text that is already tokenised: stream p reads the first T ids of `token_ids[p]`.

    `token_ids` must hold exactly P sequences of at least T token ids of the model's vocabulary; otherwise a
    `ValueError` is raised and nothing changes.
    """
    streams, adapter_name = _find_adapter(model, adapter_name)
    num_streams, prefix_length = streams.num_streams[adapter_name], streams.prefix_length[adapter_name]
    decoder = streams.decoder
    windows = _check_token_ids(token_ids, num_streams, prefix_length, decoder.get_input_embeddings().num_embeddings)
    layers = streams.attention_layers()
    targets = [(layer.parscale_prefix_k[adapter_name], layer.parscale_prefix_v[adapter_name]) for layer in layers]
    if any(prefix.is_meta for pair in targets for prefix in pair):
        raise ValueError(
            f"Adapter {adapter_name!r} has no weights yet (created with low_cpu_mem_usage=True): create it with "
            "low_cpu_mem_usage=False to initialise it from text."
        )
    if any(parameter.is_meta for parameter in decoder.parameters()):
        raise ValueError(
            "The base model's weights are not loaded in this process (some are on the meta device), and text "
            "initialisation runs the base model. In a distributed run, initialise on process 0 and broadcast "
            "(broadcast_prefixes)."
        )
    keys_and_values = base_model_keys_and_values(decoder, windows, streams.position_table is not None)
    for prefixes, cached in zip(targets, keys_and_values, strict=True):
        for prefix, tensor in zip(prefixes, cached):  # checked for every layer before any is written
            if prefix.shape != tensor.shape:
                raise ValueError(
                    f"The model's cached keys/values have shape {tuple(tensor.shape)}, the prefixes {tuple(prefix.shape)}."
                )
    with torch.no_grad():
        for (prefix_k, prefix_v), (keys, values) in zip(targets, keys_and_values):
            prefix_k.copy_(keys)
            prefix_v.copy_(values)


def broadcast_prefixes(model: nn.Module, device: torch.device | str, adapter_name: str | None = None) -> None:
    """Give every process of a distributed run process 0's prefixes of an adapter (``torch.distributed.broadcast``).

    Every process calls it, once process 0 has initialised its prefixes: text initialisation needs the base model's
    real weights, which only process 0 is sure to hold (docs/design.md, "Text initialisation on several
    processes"). The tensors travel through `device`, the process's own device in the process group (NCCL sends only
    tensors on the process's GPU, gloo CPU tensors), and are written back where the prefixes are. A process whose
    prefixes are on the meta device cannot receive them: `ValueError`, before any broadcast.

    Args:
        model: A model with ParScale adapters, the same on every process.
        device: This process's device in the process group.
        adapter_name: The adapter whose prefixes are broadcast; default: the active one.

    Example::

        if torch.distributed.get_rank() == 0:
            init_prefixes_from_text(model, tokenizer, texts)
        broadcast_prefixes(model, device=torch.device("cuda", local_rank))
    """
    streams, adapter_name = _find_adapter(model, adapter_name)
    prefixes = [prefix for layer in streams.attention_layers() for prefix in layer.prefix(adapter_name)]
    if any(prefix.is_meta for prefix in prefixes):
        raise ValueError(
            f"Process {torch.distributed.get_rank()} holds adapter {adapter_name!r}'s prefixes on the meta device, so "
            "it cannot receive process 0's: load the base model's attention weights on every process."
        )
    with torch.no_grad():
        for prefix in prefixes:
            received = prefix.detach().to(device)
            torch.distributed.broadcast(received, src=0)
            prefix.copy_(received)


def base_model_keys_and_values(
    decoder: nn.Module, token_ids: torch.Tensor, from_zero: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's post-rotary keys and values, (P, kv_heads, T, head_dim), of the base model (ParScale disabled)
    reading the P rows of `token_ids` (P, T) at positions -T..-1: what the cache holds after reading them.

    With `from_zero` (a model with a position table, which has no negative positions) the text is read at positions
    0..T-1 instead. Sliding-window layers read the text with their window, as the base model would, and keep all T
    keys/values (a cache of full layers).
    """
    num_rows, length = token_ids.shape
    device = next(decoder.parameters()).device
    token_ids = token_ids.to(device)
    first = 0 if from_zero else -length
    positions = torch.arange(first, first + length, device=device).expand(num_rows, length)
    cache = DynamicCache()  # full layers: a sliding-window layer would keep only the window's last tokens
    with base_model_only(decoder), torch.no_grad():
        decoder(input_ids=token_ids, position_ids=positions, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def document_boundary(tokenizer: Any) -> int:
    """The token each stream's text ends with: the tokenizer's BOS token (a document's start), or its EOS token where
    it has none. Read with no boundary, the model takes the text for the beginning of the input's own document, and a
    fresh adapter starts above the base model; with one it starts at it (RESULTS.md, "Where does a fresh
    text-initialised adapter start?"). `ValueError` if the tokenizer has neither token."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    boundary = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if boundary is None:
        raise ValueError(
            "prefix_init='text' ends each stream's text with the tokenizer's BOS or EOS token, and this tokenizer has "
            "neither: give the token ids yourself with init_prefixes_from_token_ids."
        )
    return boundary


def with_boundary(windows: torch.Tensor, boundary: int) -> torch.Tensor:
    """(P, T − 1) token ids and a last column of `boundary`: (P, T)."""
    return torch.cat([windows, windows.new_full((windows.shape[0], 1), boundary)], dim=1)


def _text_token_ids(tokenizer: Any, texts: Sequence[str], num_streams: int, prefix_length: int) -> torch.Tensor:
    """Each of `num_streams` texts' first `prefix_length` − 1 token ids and the document boundary, (P, T);
    `ValueError` for bad texts."""
    check_prefix_texts(texts, num_streams)
    boundary = document_boundary(tokenizer)
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return with_boundary(_check_token_ids(token_ids, num_streams, prefix_length - 1, vocabulary_size=None), boundary)


def config_token_ids(config: ParScaleConfig) -> torch.Tensor:
    """The token ids a new adapter with ``prefix_init="text"`` starts from: ``prefix_init_text`` tokenised."""
    if config.prefix_init_text is None:
        raise ValueError(
            "prefix_init='text' needs prefix_init_text (P texts) and tokenizer_name_or_path to create an adapter. "
            "ParScaleSFTTrainer and `parscale sft` take the texts from the training data when none are given; "
            "otherwise create the adapter with prefix_init='random' and call init_prefixes_from_text."
        )
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    return _text_token_ids(tokenizer, config.prefix_init_text, config.P, config.prefix_length)


def _find_adapter(model: nn.Module, adapter_name: str | None) -> tuple[ParScaleStreams, str]:
    streams = [module for module in model.modules() if isinstance(module, ParScaleStreams)]
    if len(streams) != 1:
        raise ValueError(f"Expected a model with ParScale adapters (one ParScaleStreams), found {len(streams)}.")
    streams = streams[0]
    if adapter_name is None:
        adapter_name = streams.active_adapters[0]
    if adapter_name not in streams.num_streams:
        raise ValueError(f"No ParScale adapter named {adapter_name!r}; adapters: {sorted(streams.num_streams)}.")
    return streams, adapter_name


def _check_token_ids(token_ids: Any, num_streams: int, prefix_length: int, vocabulary_size: int | None) -> torch.Tensor:
    """The first `prefix_length` ids of each of `num_streams` rows as a (P, T) tensor, or `ValueError`."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence) or len(token_ids) != num_streams:
        raise ValueError(f"Expected P={num_streams} token sequences, one per stream, got {token_ids!r:.80}.")
    lengths = [len(row) if isinstance(row, Sequence) else None for row in token_ids]
    short = [stream for stream, length in enumerate(lengths) if length is None or length < prefix_length]
    if short:
        raise ValueError(
            f"Every stream's text needs at least {prefix_length} tokens (prefix_length, less the document boundary "
            f"where the text is read with a tokenizer); stream(s) {short} have {[lengths[stream] for stream in short]}."
        )
    windows = [list(row[:prefix_length]) for row in token_ids]
    if not all(isinstance(token, int) and not isinstance(token, bool) for row in windows for token in row):
        raise ValueError("Token ids must be integers.")
    if vocabulary_size is not None and not all(0 <= token < vocabulary_size for row in windows for token in row):
        raise ValueError(f"Token ids must lie in the model's vocabulary, 0..{vocabulary_size - 1}.")
    return torch.tensor(windows, dtype=torch.long)
