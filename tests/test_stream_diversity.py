"""The HumanEval experiment's stream-diversity variant (experiments/stream_diversity.py): ND-LoRA's Barlow Twins term
against a plain reference, and the trainer's loss with it against the plain trainer's."""

import math

import pytest
import torch
from reference import LENGTH, training_args
from test_experiments import import_experiment
from test_sft import source_texts, windows
from tiny_models import tiny_model, tiny_tokenizer

from peft_parscale import ParScaleConfig
from peft_parscale.sft import ParScaleSFTTrainer

stream_diversity = import_experiment("stream_diversity")


def reference_term(states: list) -> float:
    """ND-LoRA's term (kushalc/nd-lora, utils/orthogonal_lora_loss.py, "standard") written out with loops: states[p][n]
    is stream p's vector of D features at token n."""
    P, N, D = len(states), len(states[0]), len(states[0][0])
    standardised = [[[0.0] * D for _ in range(N)] for _ in range(P)]
    for p in range(P):
        for d in range(D):
            column = [states[p][n][d] for n in range(N)]
            mean = sum(column) / N
            deviation = math.sqrt(sum((x - mean) ** 2 for x in column) / (N - 1))  # unbiased, as torch.std
            for n in range(N):
                standardised[p][n][d] = (column[n] - mean) / (deviation + 1e-8)
    distances = []
    for p in range(P):
        for q in range(p + 1, P):
            squares = 0.0
            for i in range(D):
                for j in range(D):
                    correlation = sum(standardised[p][n][i] * standardised[q][n][j] for n in range(N)) / N
                    squares += (correlation - (1.0 if i == j else 0.0)) ** 2
            distances.append(math.sqrt(squares))
    return sum(distances) / len(distances) * 4096 / (D * (D - 1) / 2)


def test_barlow_twins_term_matches_a_plain_reference():
    # 3 streams, 4 tokens, 3 features: stream 1 is stream 0 with its features permuted and scaled, stream 2 unrelated
    states = [
        [[1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [4.0, 1.0, 1.0]],
        [[0.0, 2.0, 4.0], [1.0, 4.0, 0.0], [3.0, 0.0, 2.0], [1.0, 8.0, 2.0]],
        [[5.0, -1.0, 0.5], [0.0, 2.0, 1.5], [1.0, 1.0, -2.0], [-3.0, 0.0, 1.0]],
    ]
    term = stream_diversity.barlow_twins_term(torch.tensor(states, dtype=torch.float64))
    # float64 throughout, a few hundred operations on numbers below 10^4: rounding stays below 1e-12 relative
    assert term.item() == pytest.approx(reference_term(states), rel=1e-12)
    # identical streams with uncorrelated features: C = (N - 1)/N · I (an unbiased deviation, then a mean over N, as
    # ND-LoRA's code has it), so ‖C - I‖_F = √D / N, and the term is 4096 · √2 / 4 for N = 4 tokens, D = 2 features;
    # the 1e-8 added to the deviation (√(4/3)) shrinks C by 2·1e-8/√(4/3) and so raises the term by 7e-8 of itself
    uncorrelated = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]
    term = stream_diversity.barlow_twins_term(torch.tensor([uncorrelated] * 2, dtype=torch.float64))
    assert term.item() == pytest.approx(4096 * math.sqrt(2) / 4, rel=1e-7)


def make_trainer(tmp_path, weight: float, layer: int, P: int = 3):
    # equal-length windows, two per micro-batch: B = 2 sequences, no padding, P·B stream rows
    tokenizer = tiny_tokenizer()
    return stream_diversity.StreamDiversityTrainer(
        model=tiny_model(vocab_size=len(tokenizer)),
        args=training_args(tmp_path, per_device_train_batch_size=2),
        train_dataset=windows(tokenizer, source_texts(), 4),
        processing_class=tokenizer,
        peft_config=ParScaleConfig(P=P, prefix_length=4),
        diversity_weight=weight,
        diversity_layer=layer,
    )


def losses(trainer, **kwargs) -> tuple[float, float]:
    """The diversity trainer's loss and the plain trainer's (`ParScaleSFTTrainer.compute_loss`) on one batch."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        with_term = trainer.compute_loss(trainer.model, dict(batch), **kwargs).item()
        plain = ParScaleSFTTrainer.compute_loss(trainer, trainer.model, dict(batch), **kwargs).item()
    return with_term, plain


def test_a_zero_weight_gives_the_plain_loss_exactly(tmp_path):
    trainer = make_trainer(tmp_path, weight=0.0, layer=1)
    with_term, plain = losses(trainer)
    assert with_term == plain and len(trainer.diversity_terms) == 1 and trainer.diversity_terms[0] > 0


@pytest.mark.parametrize("layer", [1, 2])  # decoder layer 1's output; 2: the final norm's (the model has 2 layers)
def test_the_loss_grows_by_the_weighted_term_of_the_streams_hidden_states(tmp_path, layer):
    weight, P = 0.5, 3
    trainer = make_trainer(tmp_path, weight=weight, layer=layer, P=P)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():  # transformers' own record of the hidden states: P·B rows, row p·B + b
        hidden = trainer.model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[layer]
    B = batch["input_ids"].shape[0]
    assert hidden.shape == (P * B, LENGTH, 48)
    states = [[token for b in range(B) for token in hidden[p * B + b].double().tolist()] for p in range(P)]
    expected = weight * reference_term(states)

    with_term, plain = losses(trainer)
    # float32 losses near 25 (ulp 2e-6) and a float32 term whose correlations sum 48 products each (relative error
    # near 1e-6): 1e-5 of the weighted term (about 20 here) bounds both
    assert with_term - plain == pytest.approx(expected, rel=1e-5)
    # with num_items_in_batch the loss is normalised over the accumulated batch, and so is the term: / accumulation
    trainer.current_gradient_accumulation_steps = 2
    with_term, plain = losses(trainer, num_items_in_batch=torch.tensor(2 * (LENGTH - 1)))
    assert with_term - plain == pytest.approx(expected / 2, rel=1e-5)

    def gradient(compute_loss) -> torch.Tensor:
        trainer.model.zero_grad()
        compute_loss(trainer, trainer.model, dict(batch)).backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])

    # the term is differentiated too: it changes the adapter's gradient
    assert not torch.equal(gradient(type(trainer).compute_loss), gradient(ParScaleSFTTrainer.compute_loss))


def test_the_diversity_trainer_refuses_a_single_stream_and_a_layer_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="P >= 2"):
        make_trainer(tmp_path, weight=0.1, layer=1, P=1)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        make_trainer(tmp_path, weight=0.1, layer=3)
