"""NASA (SNOOPI's negative-away steer attention) as a diffusers attention processor."""

from __future__ import annotations

import math

import pytest
import torch
from t2i_fixtures import TEXT_HIDDEN, tiny_unet

from onestep.errors import ConfigError
from onestep.samplers.nasa import NASAAttnProcessor, cross_attention_layers, nasa


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_unet(TEXT_HIDDEN).eval()


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    enc = torch.randn(b, 5, TEXT_HIDDEN, generator=g)
    neg = torch.randn(1, 5, TEXT_HIDDEN, generator=g)
    return x, enc, neg


def test_alpha_zero_is_the_plain_forward_and_processors_come_back(unet):
    x, enc, neg = _inputs()
    t = torch.tensor([10, 900])
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=enc).sample
        layers = cross_attention_layers(unet)
        # every transformer block's attn2 (down, mid and up blocks), no self-attention
        assert len(layers) == sum(n.endswith("attn2") for n, _ in unet.named_modules()) == 4
        saved = [m.processor for m in layers]
        for m in layers:  # install it by hand with alpha 0: nothing may change
            m.set_processor(NASAAttnProcessor(neg, 0.0))
        zero = unet(x, t, encoder_hidden_states=enc).sample
        for m, p in zip(layers, saved):
            m.set_processor(p)
        with nasa(unet, neg, 0.0):
            also_zero = unet(x, t, encoder_hidden_states=enc).sample
        with nasa(unet, neg, 0.3):
            steered = unet(x, t, encoder_hidden_states=enc).sample
            assert all(isinstance(m.processor, NASAAttnProcessor) for m in layers)
        after = unet(x, t, encoder_hidden_states=enc).sample
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)
    assert torch.equal(also_zero, plain) and torch.equal(after, plain)
    assert (steered - plain).abs().max() > 1e-4
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_alpha_positive_equals_the_hand_computation_on_one_layer(unet):
    attn = cross_attention_layers(unet)[0]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 7, attn.to_q.in_features, generator=g)
    _, enc, neg = _inputs(2)
    alpha = 0.4

    def head_attention(context):
        q, k, v = attn.to_q(h), attn.to_k(context.expand(2, -1, -1)), attn.to_v(context.expand(2, -1, -1))
        d = q.shape[-1] // attn.heads
        split = lambda y: y.reshape(2, -1, attn.heads, d).permute(0, 2, 1, 3)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (w @ split(v)).permute(0, 2, 1, 3).reshape(2, -1, attn.heads * d)

    with torch.no_grad():
        by_hand = attn.to_out[0](head_attention(enc) - alpha * head_attention(neg))
        with nasa(unet, neg, alpha):
            ours = attn(h, encoder_hidden_states=enc)
        plain = attn(h, encoder_hidden_states=enc)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, attn.to_out[0](head_attention(enc)), rtol=1e-5, atol=1e-6)


def test_nasa_needs_cross_attention_and_a_valid_alpha():
    from diffusers import UNet2DModel

    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                      down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    with pytest.raises(ConfigError, match="cross-attention"):
        with nasa(net, torch.zeros(1, 2, 3), 0.1):
            pass
    with pytest.raises(ConfigError, match=">= 0"):
        NASAAttnProcessor(torch.zeros(1, 2, 3), -1.0)
