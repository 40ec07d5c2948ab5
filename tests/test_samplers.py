import torch

from onestep.conditioning import Conditioning
from onestep.denoiser import Denoiser
from onestep.samplers.ddim import ddim_sample, ddim_timesteps
from onestep.samplers.noise import per_sample_noise, seed_generators
from onestep.samplers.student import sample_student_from_seeds, student_sample
from onestep.teachers import load_teacher


class CountingNet(torch.nn.Module):
    """x0-predicting toy backbone that counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, class_labels=None):
        self.calls += 1
        return 0.5 * x


class Spec:
    sample_shape = (1, 4, 4)
    conditioning = Conditioning("none")
    clip = None


def test_per_sample_noise_does_not_depend_on_batch():
    a = per_sample_noise(seed_generators([3, 4, 5]), (2, 2))
    b = per_sample_noise(seed_generators([4]), (2, 2))
    assert torch.equal(a[1], b[0])


def test_k_step_sampling_makes_k_calls_and_is_batch_independent(tiny_teacher):
    net = CountingNet()
    gen = Denoiser(net, tiny_teacher.schedule, "sample")
    for k, ts in [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249]), (8, [999, 874, 749, 624, 499, 374, 249, 124])]:
        net.calls = 0
        x, _ = sample_student_from_seeds(gen, Spec(), ts, seeds=range(6), batch_size=6)
        assert net.calls == k
        assert x.shape == (6, 1, 4, 4)
    small, _ = sample_student_from_seeds(gen, Spec(), [999, 499], seeds=range(6), batch_size=2)
    big, _ = sample_student_from_seeds(gen, Spec(), [999, 499], seeds=range(6), batch_size=6)
    torch.testing.assert_close(small, big)


def test_student_sample_renoises_between_steps(tiny_teacher):
    gen = Denoiser(CountingNet(), tiny_teacher.schedule, "sample")
    z = torch.randn(2, 1, 4, 4)
    one = student_sample(gen, [999], z)
    torch.testing.assert_close(one, 0.5 * z)  # one step: the x0 prediction from pure noise
    fresh = torch.ones(2, 1, 4, 4)
    two = student_sample(gen, [999, 500], z, renoise=lambda shape: fresh)
    a, s = tiny_teacher.schedule.alpha_sigma(torch.tensor([500]))
    torch.testing.assert_close(two, 0.5 * (a * 0.5 * z + s * fresh))


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1) == [999]
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and ts == sorted(ts, reverse=True)


def test_ddim_on_exact_gmm_teacher_lands_on_modes():
    teacher = load_teacher("gmm-grid25")
    gens = seed_generators(range(400))
    x = ddim_sample(teacher.denoiser(), per_sample_noise(gens, (2,)), num_steps=50)
    means = teacher.backbone.means.float()
    d = torch.cdist(x, means).min(dim=1).values
    assert (d < 3 * 0.2).float().mean() > 0.95
