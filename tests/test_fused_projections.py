"""The fused projections of the fast path (`peft_parscale.fused_projections`, `fast_generate(fuse_projections=True)`)
against the plain products: the same logits and the same greedy tokens, the model left as it was, and a copy that
follows the weights when they change.

The compiled variants use torch.compile's "eager" backend with `fullgraph=True`, as `test_fast_path.py` does: dynamo
traces the step exactly as on CUDA and fails on any graph break. Inductor and CUDA graphs ran on an H100
(BENCHMARKS.md, `fast_fused`).
"""

import weakref

import pytest
import torch
from peft import get_peft_model
from reference import left_padded_batch, randomize_adapter
from test_generate import greedy_without_cache
from tiny_models import tiny_model
from torch import nn
from torch._dynamo.utils import counters

from peft_parscale import ParScaleConfig
from peft_parscale.decode import causal_lm_of, fast_decoder, greedy_generate
from peft_parscale.fused_projections import FusedProjections, StackedProducts, projection_groups

TRACE_ONLY = {"backend": "eager", "fullgraph": True}


def parscale_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = get_peft_model(tiny_model("qwen2", "sdpa", dtype=dtype), ParScaleConfig(P=2, prefix_length=3)).eval()
    randomize_adapter(model)  # a trained-looking adapter, so that the streams differ
    return model


def test_fused_products_give_the_plain_logits_and_leave_the_model_as_it_was():
    """Inside the block each layer's query/key/value (with their biases) and gate/up products are one product over
    the stacked weights; the logits are the plain model's, also through a step compiled with `fullgraph` (dynamo must
    trace the stacked product and its parts without a break). In float64 a different summation order moves a logit of
    the tiny model by about 1e-15; 1e-10 is far above that and far below any mistake (a swapped or missing part moves
    logits by about 1e-2). Leaving the block puts every module's own forward back and changes no weight."""
    model = parscale_model(torch.float64)
    base = causal_lm_of(model)
    ids, _ = left_padded_batch([6, 6])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fused = FusedProjections(base)
    assert len(fused) == 2 * base.config.num_hidden_layers
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with fused.applied():
            got = model(input_ids=ids).logits
            # each group let go of its layer's activations once its last part was taken, inside the block already
            assert all(group.input is None and group.parts == () for group in fused.groups)
            compiled = torch.compile(lambda x: model(input_ids=x).logits, **TRACE_ONLY)(ids)
            attention = base.model.layers[0].self_attn.base_layer
            hidden = torch.ones(1, base.config.hidden_size, dtype=torch.float64)
            attention.q_proj(hidden)
            with pytest.raises(RuntimeError, match="another input"):
                attention.k_proj(hidden.clone())
    assert (got - expected).abs().max() < 1e-10 and (compiled - expected).abs().max() < 1e-10
    linears = [module for module in base.modules() if isinstance(module, nn.Linear)]
    assert linears and all("forward" not in module.__dict__ for module in linears)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_blocks_nest_and_only_the_outermost_puts_the_modules_back():
    base = causal_lm_of(parscale_model())
    fused = FusedProjections(base)
    q_proj = base.model.layers[0].self_attn.base_layer.q_proj
    with torch.no_grad(), fused.applied():
        with fused.applied():  # the prefill's block inside the generation's
            pass
        assert "forward" in q_proj.__dict__
    assert "forward" not in q_proj.__dict__
    # with gradients the copy would leave q/k/v and gate/up without theirs: refused, nothing put in place
    with pytest.raises(RuntimeError, match="torch.no_grad"), fused.applied():
        pass
    assert "forward" not in q_proj.__dict__


def test_fused_greedy_tokens_are_the_plain_ones_and_the_step_is_compiled_once(monkeypatch):
    """float32 greedy tokens of the fast path with fused products equal recomputation without a cache (the
    independent loop of `test_generate`), uncompiled and compiled; two generations on the same decoder compile the
    step once (the modules' forwards are put in place anew for each, and the graph's guards still hold)."""
    model = parscale_model()
    input_ids, attention_mask = left_padded_batch([5, 2, 4])
    expected = greedy_without_cache(model, input_ids, attention_mask, 6)
    stacked_inputs = []
    first = StackedProducts.first
    monkeypatch.setattr(
        StackedProducts, "first", lambda self, hidden: stacked_inputs.append(hidden.shape) or first(self, hidden)
    )
    uncompiled = greedy_generate(model, input_ids, attention_mask, 6, compile=False, fuse_projections=True)
    assert torch.equal(uncompiled, expected)
    # the stacked products ran: every group in the prefill (one forward pass of the 3 prompts) and in each of the 5
    # steps; none keeps a layer's activations afterwards
    decoder = causal_lm_of(model)._parscale_fast_decoder
    assert len(stacked_inputs) == len(decoder.fused) * 6
    assert all(group.input is None and group.parts == () for group in decoder.fused.groups)
    monkeypatch.undo()  # the counting would be traced into the compiled step (a list that grows: a guard that fails)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        compiled = greedy_generate(
            model, input_ids, attention_mask, 6, compile=True, compile_options=TRACE_ONLY, fuse_projections=True
        )
        assert torch.equal(compiled, expected)
    assert counters["stats"]["unique_graphs"] == 1
    # asked for without fusing, the same shapes give another decoder, with the plain products; the fused one is freed
    fused_decoder = weakref.ref(causal_lm_of(model)._parscale_fast_decoder)
    decoder = fast_decoder(model, 3, input_ids.shape[1] + 6, compile=True, compile_options=TRACE_ONLY)
    assert decoder.fused is None and fused_decoder() is None


def test_the_copy_follows_weights_changed_in_place_or_replaced():
    """The decoder keeps its copy between generations; a weight changed in place (an optimizer step, a
    `load_state_dict`) or a parameter replaced is copied again before the next one, so the tokens stay the plain
    model's. The change is large enough that the stale copy would give other tokens (checked)."""
    model = parscale_model()
    base = causal_lm_of(model)
    input_ids, attention_mask = left_padded_batch([5, 3])
    greedy_generate(model, input_ids, attention_mask, 6, compile=False, fuse_projections=True)
    attention = base.model.layers[0].self_attn.base_layer
    stale = greedy_without_cache(model, input_ids, attention_mask, 6)
    with torch.no_grad():
        attention.v_proj.weight.mul_(-3.0)
        base.model.layers[1].mlp.up_proj.weight = nn.Parameter(base.model.layers[1].mlp.up_proj.weight.flip(0))
    expected = greedy_without_cache(model, input_ids, attention_mask, 6)
    assert not torch.equal(expected, stale)
    tokens = greedy_generate(model, input_ids, attention_mask, 6, compile=False, fuse_projections=True)
    assert torch.equal(tokens, expected)


def test_only_plain_linear_groups_of_one_input_width_are_fused():
    """A projection that is not a plain `nn.Linear` (wrapped by another adapter, say), or that has a forward of its own,
    keeps its own product, and so does the rest of its group; so does a group whose weights differ in dtype (they
    cannot be stacked into one tensor). The other groups are fused."""

    class Wrapped(nn.Linear):
        pass

    base = causal_lm_of(parscale_model())
    attention = base.model.layers[0].self_attn.base_layer
    old = attention.k_proj
    attention.k_proj = Wrapped(old.in_features, old.out_features, bias=True)
    hooked = base.model.layers[1].mlp.up_proj
    hooked.forward = lambda hidden: nn.Linear.forward(hooked, hidden)  # as accelerate's hooks give a module its own
    other_dtype = base.model.layers[1].self_attn.base_layer.v_proj.double()
    groups = projection_groups(base)
    assert len(groups) == 2 * base.config.num_hidden_layers - 3
    assert not any(attention.q_proj in group or hooked in group or other_dtype in group for group in groups)
    with torch.no_grad(), FusedProjections(base).applied():
        pass
    assert "forward" in hooked.__dict__  # left as it was
