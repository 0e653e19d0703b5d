"""Training: only the ParScale weights learn, the backbone stays bitwise frozen, and the usual training paths work."""

import pytest
import torch
from peft import get_peft_model
from reference import left_padded_batch, positions_from_mask, randomize_adapter
from tiny_models import VOCAB, tiny_model

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig


def make(P=3, **kwargs):
    model = get_peft_model(tiny_model("qwen2", **kwargs), ParScaleConfig(P=P, prefix_length=4))
    randomize_adapter(model, scale=0.1)
    return model


def batch():
    input_ids, attention_mask = left_padded_batch([8, 5, 7])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_parscale_weights_learn_and_the_backbone_is_bitwise_unchanged(checkpointing):
    model = make()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if "parscale_" not in n}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "parscale_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch()).loss
        loss.backward()
        for name, parameter in model.named_parameters():
            has_grad = parameter.grad is not None and parameter.grad.abs().sum() > 0
            assert has_grad == ("parscale_" in name), name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if n in backbone)
    assert all(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model = make()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        loss = model(**batch()).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_loss_is_the_base_models_own_loss_on_aggregated_logits():
    model = make()
    inputs = batch()
    output = model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]))
    shifted_logits = output.logits[:, :-1].reshape(-1, VOCAB)
    shifted_labels = inputs["labels"][:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_bf16_autocast_training_step():
    model = make()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch()).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_logits_to_keep_and_the_decoder_output_are_aggregated():
    model = make()
    inputs = batch()
    del inputs["labels"]
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
        # TRL may run the decoder itself and apply the LM head to `last_hidden_state`.
        causal_lm = model.get_base_model()
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
    torch.testing.assert_close(last, full[:, -1:])
    assert hidden.shape == (3, 8, causal_lm.config.hidden_size)
    torch.testing.assert_close(causal_lm.lm_head(hidden), full)
