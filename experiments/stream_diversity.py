"""A stream-diversity term for ParScale training: ND-LoRA's Barlow Twins loss between the P streams, as an experiment.

ND-LoRA (Chakrabarti & Balachundhar, arXiv 2510.20690) trains P streams of a frozen Qwen2.5-0.5B with a Barlow Twins
term added to the language-modelling loss. This module computes that term as the authors' released code does
(github.com/kushalc/nd-lora, ``utils/orthogonal_lora_loss.py``, ``bt_method="standard"``, the default of its
``train_parscale.py``): for every pair of streams p < q,

    Z_p     = stream p's hidden states at one layer over the micro-batch's N tokens, standardised per feature
              (mean 0 and unbiased standard deviation 1 over the tokens; 1e-8 added to the deviation)
    C_pq    = Z_pᵀ Z_q / N                                  (D × D cross-correlation of the two streams)
    term    = mean over the pairs of ‖C_pq − I‖_F · 4096 / (D(D − 1)/2)

and training minimises loss + λ · term. The target is the identity, as in Barlow Twins: a feature of one stream is
pulled towards the same feature of the other and away from every other feature. The layer l is an index into
transformers' ``hidden_states`` (ND-LoRA's ``design_layer``, 20 of Qwen2.5-0.5B's 24 in its tuned runs): l < L is the
output of decoder layer l (counting from 1), l = L the final norm's output, which the aggregator mixes. Every position
counts (ND-LoRA's pre-training windows had no prompt tokens). Left out: ND-LoRA's ``--bt-normalization-warmup`` (on in
its tuned runs), which divides the term by its running mean over the warm-up steps, times 20, and ramps λ up over
them; λ here weighs the raw term.

Not a package option: the package gets it only after a measured win (issue 20, item 6). The trainer captures the
hidden states with a forward hook, whose output holds the P·B stream rows (row p·B + b) before the decoder's hook
aggregates them, and adds the term in ``compute_loss``, the override transformers' ``Trainer`` documents.

Example::

    trainer = StreamDiversityTrainer(
        model=path, args=training_args, train_dataset=pairs, peft_config=ParScaleConfig(P=4),
        diversity_weight=0.1, diversity_layer=20,
    )
    trainer.train()
    sum(trainer.diversity_terms) / len(trainer.diversity_terms)  # the mean term over the micro-batches
"""

from __future__ import annotations

from itertools import combinations

import torch

from peft_parscale import ParScaleConfig
from peft_parscale.sft import ParScaleSFTTrainer


def barlow_twins_term(stream_states: torch.Tensor) -> torch.Tensor:
    """ND-LoRA's Barlow Twins term (see the module docstring) of (P, N, D) stream states: P streams, N tokens, D
    features. Computed in at least float32."""
    num_streams, num_tokens, num_features = stream_states.shape
    states = stream_states.to(torch.promote_types(stream_states.dtype, torch.float32))
    standardised = (states - states.mean(1, keepdim=True)) / (states.std(1, keepdim=True) + 1e-8)
    identity = torch.eye(num_features, device=states.device, dtype=states.dtype)
    distances = [
        torch.linalg.matrix_norm(standardised[p].T @ standardised[q] / num_tokens - identity)
        for p, q in combinations(range(num_streams), 2)
    ]
    # ND-LoRA's scale: per off-diagonal pair of features, times 4096
    return torch.stack(distances).mean() * 4096 / (num_features * (num_features - 1) / 2)


class StreamDiversityTrainer(ParScaleSFTTrainer):
    """``ParScaleSFTTrainer`` that adds ``diversity_weight`` times `barlow_twins_term` of the streams' hidden states
    at ``diversity_layer`` (an index into transformers' ``hidden_states``) to the training loss. ``diversity_terms``
    holds the term of every micro-batch; the logs get their mean since the last log as ``diversity``."""

    def __init__(self, *args, diversity_weight: float, diversity_layer: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.model.active_peft_config
        if not isinstance(config, ParScaleConfig) or config.P < 2:
            raise ValueError("a stream-diversity term needs a ParScale adapter with P >= 2 streams")
        decoder = self.model.get_base_model().get_decoder()
        if not 1 <= diversity_layer <= len(decoder.layers):
            raise ValueError(
                f"diversity_layer is 1..{len(decoder.layers)} (hidden_states index), not {diversity_layer}"
            )
        module = decoder.norm if diversity_layer == len(decoder.layers) else decoder.layers[diversity_layer - 1]
        module.register_forward_hook(self._keep_stream_states)
        self.num_streams, self.diversity_weight = config.P, diversity_weight
        self.diversity_terms: list[float] = []
        self._stream_states, self._logged_terms = None, 0

    def _keep_stream_states(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._stream_states = output  # (P·B, S, D), stream-major

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "attention_mask" in inputs and not inputs["attention_mask"].all():
            raise ValueError("the stream-diversity term counts every position: train padding-free (packing)")
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        states, self._stream_states = self._stream_states, None
        term = barlow_twins_term(states.reshape(self.num_streams, -1, states.shape[-1]))
        self.diversity_terms.append(term.item())
        # With num_items_in_batch the loss is already normalised over the accumulated batch, and Trainer does not
        # divide it by the accumulation steps: a per-micro-batch term is divided here, as TRL does with the MoE aux loss
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        extra = self.diversity_weight * term / steps
        return (result[0] + extra, result[1]) if return_outputs else result + extra

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        recent = self.diversity_terms[self._logged_terms :]
        if "loss" in logs and recent:
            logs["diversity"] = sum(recent) / len(recent)
            self._logged_terms = len(self.diversity_terms)
        super().log(logs, start_time)
