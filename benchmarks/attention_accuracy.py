"""How far a training attention kernel's output and gradients lie from exact arithmetic, at the prefix attention's
shape: every query sees the T prefix keys and the keys up to its own position (causal aligned to the lower right, as
`torch.nn.attention.bias.causal_lower_right` gives sdpa, which is what the package's lower-right bias does in training).

The kernel runs in the training dtype through sdpa (with `--train-attention`'s implementation in place); the reference
is the same attention written out (softmax of the scaled scores under the mask, times the values) in float64, on the
same inputs. The key and value gradients are reported for the prefix keys apart from the others: the prefix's keys
and values are what the adapter trains, and a kernel that mishandled the alignment would show there first. Attention
over random keys is spread over the whole sequence, which hides a few mishandled keys, so the queries and keys are also
drawn sharper (`SHARPNESS`: scores' standard deviation), as a trained model's attention is. Each record also times
the kernel's forward and backward, and names what ran (the GPU kernels; on a CPU, the operators): a replacement that
was put in place but not reached would otherwise time and measure as the kernel it replaces.

Run through `python -m benchmarks.run --suites attention_accuracy --train-attention bias,bias_fa4`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .measure import Clock, launched, median
from .training import FLASH_ATTENTION_IMPLS, flash_attention_impl, flash_attention_impl_missing

SHARPNESS = (1.0, 4.0)
TIMED_RUNS = 10  # forward and backward of one layer: about a millisecond each on an H100
TENSORS = ("output", "query_grad", "key_grad_prefix", "key_grad_rest", "value_grad_prefix", "value_grad_rest")


def accuracy_refusal(attention: str, device: torch.device) -> str | None:
    """Why `attention` cannot be measured on `device` (None if it can): the bias's kernels only, FlashAttention-2's
    or an implementation put in its place that is installed."""
    if attention != "bias" and attention not in FLASH_ATTENTION_IMPLS:
        return f"attention_accuracy measures the bias's kernels only, not {attention!r}"
    return flash_attention_impl_missing(attention, device)


@contextlib.contextmanager
def training_kernel(attention: str, device: torch.device) -> Iterator[None]:
    """sdpa as the training step reaches it for `attention` ("bias", or one of `FLASH_ATTENTION_IMPLS`): on CUDA its
    flash kernels only (FlashAttention-2, or the implementation put in place); on a CPU whatever sdpa picks."""
    if device.type != "cuda":
        yield
        return
    with contextlib.ExitStack() as stack:
        if attention in FLASH_ATTENTION_IMPLS:
            stack.enter_context(flash_attention_impl(FLASH_ATTENTION_IMPLS[attention]))
        stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        yield


def attention_and_gradients(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output_grad: torch.Tensor, exact: bool
) -> list[torch.Tensor]:
    """The output and the query, key and value gradients for `output_grad`: through sdpa with the lower-right causal
    bias, or (`exact`) written out in the inputs' dtype."""
    query, key, value = (t.detach().requires_grad_() for t in (query, key, value))
    queries, keys = query.shape[-2], key.shape[-2]
    if exact:
        visible = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)
        scores = (query @ key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
        output = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ value
    else:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(queries, keys))
    output.backward(output_grad)
    return [output.detach(), query.grad, key.grad, value.grad]


def attention_errors(
    attention: str,
    batch: int,
    heads: int,
    queries: int,
    prefix: int,
    head_dim: int,
    sharpness: float,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> dict:
    """One record: per tensor (`TENSORS`), the kernel's relative error (Frobenius norm of the difference over the
    reference's) and largest absolute error against the float64 reference; and the kernel's forward and backward time,
    the median of `TIMED_RUNS` after the measured one (which compiles a kernel that is compiled on first use)."""
    generator = torch.Generator().manual_seed(seed)
    # unit-variance queries and keys give scores of standard deviation 1; scaling each by √s gives s
    shape = (batch, heads)
    query = torch.randn(*shape, queries, head_dim, generator=generator) * math.sqrt(sharpness)
    key = torch.randn(*shape, prefix + queries, head_dim, generator=generator) * math.sqrt(sharpness)
    value = torch.randn(*shape, prefix + queries, head_dim, generator=generator)
    output_grad = torch.randn(*shape, queries, head_dim, generator=generator)
    inputs = [t.to(device=device, dtype=dtype) for t in (query, key, value, output_grad)]
    clock = Clock(device)
    with training_kernel(attention, device):
        tested = attention_and_gradients(*inputs, exact=False)
        times = [clock.time_ms(lambda: attention_and_gradients(*inputs, exact=False))[1] for _ in range(TIMED_RUNS)]
        kernels = launched(lambda: attention_and_gradients(*inputs, exact=False), device)
    # the reference starts from the kernel's own (rounded) inputs, so only the kernel's arithmetic differs
    reference = attention_and_gradients(*(t.double() for t in inputs), exact=True)

    def split(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        output, query_grad, key_grad, value_grad = tensors
        apart = [part for grad in (key_grad, value_grad) for part in (grad[..., :prefix, :], grad[..., prefix:, :])]
        return [output, query_grad, *apart]  # in the order of TENSORS

    errors, largest = {}, {}
    for name, got, want in zip(TENSORS, split(tested), split(reference), strict=True):
        difference = got.double() - want
        errors[name] = (difference.norm() / want.norm()).item()
        largest[name] = difference.abs().max().item()
    return {
        "suite": "attention_accuracy",
        "attention": attention,
        "sharpness": sharpness,
        "batch": batch,
        "heads": heads,
        "queries": queries,
        "prefix": prefix,
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "relative_error": errors,
        "max_abs_error": largest,
        "forward_backward_ms": median(times),
        "kernels": kernels,
    }
