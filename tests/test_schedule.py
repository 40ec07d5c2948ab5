import pytest
import torch
from diffusers import DDPMScheduler

from onestep.conditioning import Conditioning, cfg, lcm_w_to_scale
from onestep.errors import ConfigError
from onestep.schedule import NoiseSchedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule):
    cfg_ = dict(num_train_timesteps=1000, beta_schedule=beta_schedule)
    s = NoiseSchedule.from_scheduler_config(cfg_)
    ref = DDPMScheduler(**cfg_)
    t = torch.tensor([0, 10, 500, 999])
    a, sig = s.alpha_sigma(t)
    torch.testing.assert_close(a, ref.alphas_cumprod[t].sqrt().float())
    torch.testing.assert_close(a**2 + sig**2, torch.ones(4))
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_roundtrip(pt):
    s = NoiseSchedule.from_scheduler_config(dict(num_train_timesteps=1000, beta_schedule="linear"))
    x0, noise = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([5, 400, 900])
    x_t = s.add_noise(x0, noise, t)
    pred = s.from_x0(x0, x_t, t, pt)
    torch.testing.assert_close(s.to_x0(pred, x_t, t, pt), x0, atol=1e-4, rtol=1e-4)
    if pt == "epsilon":
        torch.testing.assert_close(pred, noise, atol=1e-4, rtol=1e-4)


def test_flow_matching_config_builds_a_flow_schedule_and_refuses_dynamic_shifting():
    s = NoiseSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000})
    assert s.kind == "flow" and s.num_train_timesteps == 1000  # tests/test_t2i_flow.py checks it against diffusers
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        NoiseSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})


def test_sample_t_range_and_errors():
    s = NoiseSchedule.from_scheduler_config(dict(num_train_timesteps=1000))
    t = s.sample_t(2000, 20, 980, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 980 and t.dtype == torch.long
    with pytest.raises(ConfigError):
        s.sample_t(4, 0, 1000)


def test_cfg_convention():
    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(cfg(u, c, 1.0), c)  # s = 1: no guidance
    assert torch.equal(cfg(u, c, 0.0), u)
    torch.testing.assert_close(cfg(u, c, torch.tensor([2.0, 3.0])), torch.tensor([[2.0] * 3, [3.0] * 3]))
    assert lcm_w_to_scale(7.0) == 8.0  # LCM's x_c + w (x_c - x_u) is our s = w + 1


def test_class_conditioning_null_and_drop():
    c = Conditioning("class", 10, 10)
    g = torch.Generator().manual_seed(0)
    y = c.sample(1000, generator=g)
    assert y.min() >= 0 and y.max() <= 9
    assert torch.equal(c.null(3), torch.tensor([10, 10, 10]))
    dropped = c.drop(y, 0.5, generator=g)
    frac = (dropped == 10).float().mean().item()
    assert 0.4 < frac < 0.6
    with pytest.raises(ConfigError):
        c.from_labels([10])
