"""Prefix reparameterisation while training (``ParScaleConfig.prefix_projection``; Li & Liang, "Prefix-Tuning", 2021).

Li & Liang found prefixes trained directly unstable, and trained them through a small MLP instead:
``prefix = MLP(E)`` with a learned embedding E, shared by all layers; PEFT offers the same as
``PrefixTuningConfig.prefix_projection``. Here the MLP adds to the stored prefixes rather than replacing them,

    prefix[l] = stored[l] + MLP(E)[l]          (keys and values alike, in every layer l)

so that the start is the stored initialisation (random or text, see ``init.py``): the MLP's output layer starts at
zero. The stored prefixes stay frozen while the MLP and E train. An adapter is saved with its merged prefixes
(``ParScaleModel._get_adapter_state_dict``) and without the MLP, so the file is an ordinary ParScale adapter; loaded
for inference, it has no projection.

Example::

    model = get_peft_model(base_model, ParScaleConfig(P=4, prefix_projection=True, prefix_projection_hidden=512))
    ...  # train
    model.save_pretrained("out")  # the merged prefixes
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixProjection(nn.Module):
    """MLP(E) for the prefixes of every layer: E is (P, T, hidden), and each of its P·T rows gives the keys and values
    of that stream and prefix slot in all layers at once (Linear, tanh, Linear to layers·2·kv_heads·head_dim)."""

    def __init__(
        self,
        num_streams: int,
        prefix_length: int,
        num_layers: int,
        num_key_value_heads: int,
        head_dim: int,
        hidden_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        place = {"device": device, "dtype": dtype}
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.embedding = nn.Parameter(torch.empty(num_streams, prefix_length, hidden_size, **place))
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size, **place),
            nn.Tanh(),
            nn.Linear(hidden_size, num_layers * 2 * num_key_value_heads * head_dim, **place),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh projection: embedding N(0, 1) (as `nn.Embedding`), first layer as `nn.Linear`, output zero."""
        nn.init.normal_(self.embedding)
        self.mlp[0].reset_parameters()
        self.reset_output()

    def reset_output(self) -> None:
        """Zero the output layer: the projection then adds nothing, and the prefixes in use are the stored ones."""
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def layer_delta(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the projection adds to layer `layer_index`'s prefix_k and prefix_v, each (P, kv_heads, T, head_dim).

        Only that layer's rows of the output layer are computed, so each attention layer asks for its own.
        """
        num_streams, prefix_length, _ = self.embedding.shape
        width = 2 * self.num_key_value_heads * self.head_dim
        output = self.mlp[2]
        rows = slice(layer_index * width, (layer_index + 1) * width)
        delta = nn.functional.linear(self.mlp[1](self.mlp[0](self.embedding)), output.weight[rows], output.bias[rows])
        delta = delta.view(num_streams, prefix_length, 2, self.num_key_value_heads, self.head_dim)
        delta = delta.permute(2, 0, 3, 1, 4)  # (k or v, P, kv_heads, T, head_dim)
        return delta[0], delta[1]
