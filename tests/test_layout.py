"""The load-time weight layout (replab.models.layout): same values, same logits, no copies."""

import torch

from replab.models.layout import linear_layout, row_major_layout


def test_linear_layout_is_bit_identical_and_copy_free(tiny):
    model = tiny
    toks = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    mlp = model.blocks[0].mlp
    assert mlp.W_in.T.is_contiguous(), "load_model should store F.linear weights transposed"
    with torch.inference_mode():
        relaid = model(toks)
        assert row_major_layout(model) == 3 * model.cfg.n_layers + 1   # W_gate/W_in/W_out + W_U
        assert mlp.W_in.is_contiguous() and not mlp.W_in.T.is_contiguous()
        shipped = model(toks)
        assert linear_layout(model) == 3 * model.cfg.n_layers + 1
        assert linear_layout(model) == 0                                # idempotent
        again = model(toks)
    assert torch.equal(relaid, shipped) and torch.equal(shipped, again)
    # TransformerLens's `W.T.contiguous()` now returns the parameter's own storage.
    assert mlp.W_in.T.contiguous().data_ptr() == mlp.W_in.data_ptr()


def test_layout_inside_inference_mode_keeps_autograd_working(tiny):
    with torch.inference_mode():
        row_major_layout(tiny)
        linear_layout(tiny)
    assert not tiny.blocks[0].mlp.W_in.is_inference()
    toks = torch.randint(0, tiny.cfg.d_vocab, (1, 5), generator=torch.Generator().manual_seed(0))
    tiny(toks).sum().backward()          # would fail on inference-tensor weights
    tiny.zero_grad(set_to_none=True)
