"""Where each generated sequence ends, and what `generate` returns after that: the fast path (`decode.fast_generate`)
reads its new tokens only at checkpoints, so it finds the ends on the host afterwards and applies `generate`'s
conventions itself.

Example::

    ends = EndOfSequences(prompt_ids, eos_token_ids=[2], stop_strings=None, pad_token_id=0)
    ends.all_ended(new_tokens)      # at a checkpoint: True once every sequence has ended
    sequences = ends.finish(sequences)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StopStringCriteria


class EndOfSequences:
    """Where each sequence ended, found on the host from the tokens read at the checkpoints, and `generate`'s output
    conventions applied from it.

    A sequence ends at its first end-of-sequence token, or at the token that completes one of the stop strings
    (transformers' `StopStringCriteria`, evaluated as `generate` does after every token, on the whole sequence: a stop
    string may begin in the prompt). The token that ends a sequence is kept; with an end-of-sequence id configured,
    later tokens become `pad_token_id` (without one, `generate` leaves them as generated, and so does this).
    """

    def __init__(
        self,
        prompt: torch.Tensor,
        eos_token_ids: list[int],
        stop_strings: StopStringCriteria | None,
        pad_token_id: int | None,
    ) -> None:
        self.sequences = prompt.cpu()  # the prompt and the new tokens read so far
        self.prompt_length = prompt.shape[1]
        self.eos_token_ids = torch.tensor(eos_token_ids, dtype=torch.long)
        self.stop_strings = stop_strings
        self.pad_token_id = pad_token_id
        self.end_step = torch.full((prompt.shape[0],), -1)  # the step of each sequence's last token; -1: not ended

    def all_ended(self, new_tokens: torch.Tensor) -> bool:
        """Read the steps of `new_tokens` (B, t) not read yet (the one host sync of a checkpoint); True when every
        sequence has ended."""
        first = self.sequences.shape[1] - self.prompt_length
        fresh = new_tokens[:, first:].cpu()
        self.sequences = torch.cat([self.sequences, fresh], dim=1)
        ends = torch.isin(fresh, self.eos_token_ids)
        if self.stop_strings is not None:
            for step in range(fresh.shape[1]):
                ends[:, step] |= self.stop_strings(self.sequences[:, : self.prompt_length + first + step + 1], None)
        newly_ended = ends.any(1) & (self.end_step < 0)
        if bool(newly_ended.any()):
            self.end_step[newly_ended] = first + ends.to(torch.int32).argmax(1)[newly_ended]
        return bool((self.end_step >= 0).all())

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """`sequences` as `generate` returns them: padded after each end, without the steps after the last end."""
        self.all_ended(sequences[:, self.prompt_length :])
        new_tokens = sequences[:, self.prompt_length :]
        if bool((self.end_step >= 0).all()):
            new_tokens = new_tokens[:, : int(self.end_step.max()) + 1]
        if self.pad_token_id is not None:
            end_step = self.end_step.to(new_tokens.device)[:, None]
            steps = torch.arange(new_tokens.shape[1], device=new_tokens.device)[None]
            new_tokens = new_tokens.masked_fill((end_step >= 0) & (steps > end_step), self.pad_token_id)
        return torch.cat([sequences[:, : self.prompt_length], new_tokens], dim=1)


def token_id_list(token_ids: int | Sequence[int] | None) -> list[int]:
    """A config's token id setting (``eos_token_id``: None, one id or several) as a list of ids."""
    return [] if token_ids is None else [token_ids] if isinstance(token_ids, int) else list(token_ids)
