"""BatchFormer against its contract (docs/method.md#batchformer) and a hand-written post-norm attention layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from bfcl.batchformer import BatchFormer

N, C = 5, 8


def deterministic_batchformer(dim: int = C) -> BatchFormer:
    """Train mode with dropout off, so two calls on the same input give the same output."""
    torch.manual_seed(0)
    return BatchFormer(dim, dropout=0.0).double().train()


def reference_layer(layer: torch.nn.TransformerEncoderLayer, x: torch.Tensor, heads: int) -> torch.Tensor:
    """One post-norm encoder layer written out by hand, x [N, C] treated as ONE sequence of N tokens."""
    n, c = x.shape
    d = c // heads
    w_q, w_k, w_v = layer.self_attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.self_attn.in_proj_bias.chunk(3)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
    heads_out = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        # [N, N]: every sample sees every other
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d), dim=-1)
        heads_out.append(weights @ v[:, cols])
    attended = torch.cat(heads_out, dim=1) @ layer.self_attn.out_proj.weight.T + layer.self_attn.out_proj.bias
    y = F.layer_norm(x + attended, (c,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    ff = torch.relu(y @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return F.layer_norm(y + ff, (c,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)


def test_released_configuration():
    bf = BatchFormer(16)
    layer = bf.encoder_layer
    assert layer.self_attn.num_heads == 4
    assert layer.linear1.in_features == 16 and layer.linear1.out_features == 16  # feed-forward width = d_model
    assert layer.dropout.p == 0.5 and layer.dropout1.p == 0.5 and layer.dropout2.p == 0.5
    assert layer.activation is F.relu or layer.activation_relu_or_gelu == 1
    assert layer.norm_first is False  # post-norm


def test_train_mode_returns_plain_rows_first_then_batchformer_rows():
    bf = deterministic_batchformer()
    x = torch.randn(N, C, dtype=torch.float64)
    out = bf(x)
    assert out.shape == (2 * N, C)
    assert torch.equal(out[:N], x)
    torch.testing.assert_close(out[N:], reference_layer(bf.encoder_layer, x, heads=4), rtol=1e-12, atol=1e-12)


def test_eval_mode_is_the_identity():
    bf = BatchFormer(C).eval()
    x = torch.randn(N, C)
    out = bf(x)
    assert out.shape == (N, C)
    assert torch.equal(out, x)
    assert torch.equal(bf(x[:1]), x[:1])  # no batch-size limit when it is not used


def test_samples_attend_to_each_other():
    """Changing sample 0 must change the BatchFormer rows of samples 1..N-1 (and nothing else)."""
    bf = deterministic_batchformer()
    x = torch.randn(N, C, dtype=torch.float64)
    changed = x.clone()
    changed[0] += 1.0
    out, out_changed = bf(x), bf(changed)
    assert torch.equal(out[1:N], out_changed[1:N])  # plain rows of the other samples: untouched
    others = slice(N + 1, 2 * N)
    assert (out[others] - out_changed[others]).abs().amax(dim=1).min() > 1e-6  # every other sample moved


def test_wrong_layout_would_be_a_per_sample_mlp():
    """Reference for the test above: the [N, 1, C] layout (N sequences of length 1) has no
    cross-sample effect, so the property above really separates the two layouts."""
    bf = deterministic_batchformer()
    layer = bf.encoder_layer
    x = torch.randn(N, C, dtype=torch.float64)
    changed = x.clone()
    changed[0] += 1.0
    wrong, wrong_changed = layer(x.unsqueeze(1)).squeeze(1), layer(changed.unsqueeze(1)).squeeze(1)
    assert torch.equal(wrong[1:], wrong_changed[1:])
    assert not torch.allclose(bf(x)[N:], wrong)  # and the module does not compute the wrong layout


def test_permuting_the_batch_permutes_the_output():
    """No positional encoding: the batch is a set."""
    bf = deterministic_batchformer()
    x = torch.randn(N, C, dtype=torch.float64)
    perm = torch.randperm(N)
    torch.testing.assert_close(bf(x[perm])[N:], bf(x)[N:][perm], rtol=1e-12, atol=1e-12)


def test_refuses_a_batch_of_one():
    bf = BatchFormer(C).train()
    with pytest.raises(ValueError, match="at least 2 samples"):
        bf(torch.randn(1, C))
