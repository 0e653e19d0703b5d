"""How the fast path chooses each next token on the device: greedy, or sampling from uniform numbers drawn up front.

`TokenSelector` runs inside the compiled decode step of `peft_parscale.decode` (one CUDA graph per step), so it has no
random ops and no host syncs: sampling takes one uniform number per sequence and step (`draw_uniforms`) and inverts
the cumulative distribution. Its cumulative sums go through `cumulative_sum`, which keeps every scan short enough
for inductor to compile on CUDA (see there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

# The longest scan `cumulative_sum` hands to the compiler. Inductor splits a scan over several thread blocks (its
# `SplitScan`) only when the scanned dimension is longer than 8192 and there are fewer rows than twice the GPU's
# multiprocessors (`Reduction.num_splits`, `reduction_split_factor`), and that code generation failed for a
# vocabulary-sized scan on a GPU (BENCHMARKS.md, "Code changed after the GPU runs"). Scans of at most 1024 entries are
# never split, whatever the number of rows, and two levels of them cover a vocabulary of up to 1024² = 1,048,576
# tokens.
SCAN_CHUNK = 1024


def cumulative_sum(values: torch.Tensor) -> torch.Tensor:
    """`values.cumsum(-1)` of (rows, length) values, computed as two levels of scans of at most `SCAN_CHUNK` entries.

    The row is cut into chunks of `SCAN_CHUNK` (the last one padded with zeros); each chunk is scanned, and entry j of
    chunk c is its in-chunk sum plus the sum of the totals of chunks 0..c-1 (a scan of the chunk totals). This is
    `cumsum` with another order of float additions: its rounding error is bounded like that of any summation of the
    same terms (a few units of float32 rounding times the row's total for probabilities), which is also what a parallel
    `cumsum` on CUDA guarantees. For non-negative values it is non-decreasing within each chunk.

    Why not a plain `cumsum`, or the token choice outside the compiled step: see `SCAN_CHUNK` for the compiler failure
    this avoids. Leaving the whole choice uncompiled after the CUDA-graph replay of the forward pass would also avoid
    it, at the cost of a dozen separate kernels per step over (rows, vocabulary) float32 tensors launched by the host;
    inside the step they stay in the graph and inductor fuses the element-wise ones (`benchmarks.run --suites
    selector` times both).

    Example:

        ```py
        >>> cumulative_sum(torch.ones(2, 3000))[:, -1]
        tensor([3000., 3000.])
        ```
    """
    rows, length = values.shape
    chunks = -(-length // SCAN_CHUNK)
    if chunks == 1:
        return values.cumsum(-1)
    padded = F.pad(values, (0, chunks * SCAN_CHUNK - length)).view(rows, chunks, SCAN_CHUNK)
    within = padded.cumsum(-1)
    before = F.pad(within[..., -1].cumsum(-1)[:, :-1], (1, 0))  # each chunk's offset: the totals of the ones before
    return (within + before[..., None]).view(rows, chunks * SCAN_CHUNK)[:, :length]


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(-1)` of (rows, length) values: each row's index of its first largest value, found as the
    largest of each chunk of `SCAN_CHUNK` entries and then the first chunk holding the row's largest.

    The result is `argmax`'s exactly, ties included: within a chunk `max` gives the first largest entry's index, and
    the first chunk whose largest equals the row's holds the row's first largest. The last chunk is padded with the
    lowest value of the dtype (-inf for floats), which never comes before a real entry it ties with: those lie in
    earlier chunks or earlier in the same one.

    Why: inductor computes an argmax over a row in one thread block, so for the few rows of a decode step at batch 1
    one block reads the whole vocabulary while the rest of the GPU waits (BENCHMARKS.md, the `first_argmax` entry);
    chunked, each chunk has a block of its own.

    Example:

        ```py
        >>> first_argmax(torch.arange(3000.0).remainder(1500)[None])
        tensor([1499])
        ```
    """
    rows, length = values.shape
    chunks = -(-length // SCAN_CHUNK)
    if chunks == 1:
        return values.argmax(-1)
    lowest = float("-inf") if values.dtype.is_floating_point else torch.iinfo(values.dtype).min
    padded = F.pad(values, (0, chunks * SCAN_CHUNK - length), value=lowest).view(rows, chunks, SCAN_CHUNK)
    chunk_largest, within_chunk = padded.max(-1)
    chunk = chunk_largest.argmax(-1, keepdim=True)
    return (chunk * SCAN_CHUNK + within_chunk.gather(-1, chunk)).squeeze(-1)


@dataclass(frozen=True)
class TokenSelector:
    """How a decode step turns the last position's logits into the next token, on the device, without host syncs.

    Greedy (`do_sample=False`): the argmax. Sampling, for a sequence whose uniform number for this step is u in [0, 1):
    1. z = logits in float32 / `temperature`;
    2. top-k (`top_k` > 0): tokens whose z is below the k-th largest are removed (ties with the k-th are kept);
    3. top-p (`top_p` < 1): with the remaining tokens' probabilities sorted in ascending order, the tokens whose
       cumulative probability is at most 1 - top_p are removed (transformers' `TopPLogitsWarper`; the most probable
       token always stays): the nucleus is the smallest set of most probable tokens reaching top_p. Tokens whose z is
       below the nucleus's least probable token are removed (ties with it are kept);
    4. p = softmax(z) over the tokens left, and the token is the smallest token id i with p_i > 0 and
       p_0 + ... + p_i > u · (p_0 + ... + p_{V-1}): inverse-CDF sampling in token-id order.
    Steps 1-3 are transformers' temperature, top-k and top-p warpers in `generate`'s order, so the distribution is the
    one `generate` samples from; only the source of randomness differs (one uniform number instead of
    `torch.multinomial`'s own draws). Cumulative sums are `cumulative_sum`'s (float32, in chunks).

    Example:

        ```py
        >>> selector = TokenSelector(do_sample=True, temperature=0.8, top_p=0.95)
        >>> selector(torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([0.5]))
        tensor([1])
        ```
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> TokenSelector:
        """The selector of a resolved generation config (settings that do not apply to its mode are dropped)."""
        if not config.do_sample:
            return cls()
        return cls(do_sample=True, temperature=float(config.temperature), top_k=config.top_k or 0, top_p=config.top_p)

    def __call__(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """(rows, vocab) logits and (rows,) uniforms (None when greedy) in, (rows,) token ids out."""
        if not self.do_sample:
            return first_argmax(logits)
        scores = logits.float() / self.temperature
        vocab_size = scores.shape[-1]
        if 0 < self.top_k < vocab_size:
            kth_largest = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth_largest, float("-inf"))
        if self.top_p < 1.0:
            ascending = scores.sort(dim=-1).values
            cumulative = cumulative_sum(ascending.softmax(-1))
            removed = (cumulative <= 1 - self.top_p).sum(-1, keepdim=True).clamp(max=vocab_size - 1)
            scores = scores.masked_fill(scores < ascending.gather(-1, removed), float("-inf"))
        probabilities = scores.softmax(-1)
        cumulative = cumulative_sum(probabilities)
        possible = probabilities > 0
        # The total is the largest cumulative value of a possible token, not the last entry: the sums may round the
        # two differently, and u · total < total (u < 1) guarantees that a possible token qualifies, so a removed
        # token (p = 0) is never chosen.
        total = cumulative.masked_fill(~possible, 0.0).amax(-1, keepdim=True)
        qualifies = possible & (cumulative > uniforms[:, None] * total)
        return first_argmax(qualifies.to(torch.int32))  # the first qualifying token id


GREEDY = TokenSelector()


def draw_uniforms(
    generator: torch.Generator | Sequence[torch.Generator] | None, rows: int, steps: int, device: torch.device
) -> list[torch.Tensor]:
    """The uniform numbers of a sampled generation (see `fast_generate`), one (rows,) tensor per step on `device`."""
    if generator is None or isinstance(generator, torch.Generator):
        generator_device = device if generator is None else generator.device
        uniforms = torch.rand(rows, steps, generator=generator, device=generator_device)
    else:
        if len(generator) != rows:
            raise ValueError(f"Got {len(generator)} generators for {rows} sequences: pass one per returned sequence.")
        uniforms = torch.stack([torch.rand(steps, generator=g, device=g.device).to(device) for g in generator])
    # Each step's numbers in memory of their own, as every input of the compiled step (see `FastDecoder.run`).
    return [numbers.clone(memory_format=torch.contiguous_format) for numbers in uniforms.to(device).T]
