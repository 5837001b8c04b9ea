import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from drm_ray.diffusion.flow import (
    add_noise, euler_step, gaussian_kl, gaussian_log_prob, schedule_sigmas, sde_coefficients, sde_step_with_logprob,
)


@pytest.fixture
def sigmas():
    return schedule_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 4)


def test_schedule_is_the_schedulers(sigmas):
    # shift 3: s = 3u / (1 + 2u) on diffusers' grid; the last non-zero sigma is 0.0089 (sigma_min shifted twice)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]), atol=1e-4, rtol=0)


def test_zero_noise_sde_step_equals_scheduler_step(sigmas):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 16, 4, 4, generator=g)
        ref = sched.step(v, t, x, return_dict=False)[0]
        out = sde_step_with_logprob(x, v, sigmas, i, noise_level=0.0, k=3)
        assert out.log_prob is None and out.sample.shape == (2, 3, 16, 4, 4)
        for j in range(3):
            torch.testing.assert_close(out.sample[:, j], ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(euler_step(x, v, sigmas[i], sigmas[i + 1]), ref, atol=1e-6, rtol=0)
        x = ref


def test_log_prob_matches_torch_normal(sigmas):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    for i in range(len(sigmas) - 1):
        out = sde_step_with_logprob(x, v, sigmas, i, noise_level=0.7, k=5, generator=g)
        ref = torch.distributions.Normal(out.mean.unsqueeze(1), out.std_step).log_prob(out.sample).mean(dim=(2, 3, 4))
        torch.testing.assert_close(out.log_prob, ref, atol=1e-5, rtol=1e-5)
        # recomputing with the recorded children gives the same numbers (what the learner does)
        again = sde_step_with_logprob(x, v, sigmas, i, 0.7, children=out.sample)
        torch.testing.assert_close(again.log_prob, out.log_prob)


def test_coefficients_by_hand(sigmas):
    # step 0: s = 1 -> s~ = sigmas[1] = 0.8577; std_t = 0.7 sqrt(1 / (1 - 0.8577)) = 1.8556;
    # dt = 0.8577 - 1 = -0.1423; std_step = 1.8556 * sqrt(0.1423) = 0.7000
    s, dt, std_t, std_step = sde_coefficients(sigmas, 0, 0.7)
    assert s == 1.0 and dt == pytest.approx(float(sigmas[1]) - 1)
    assert std_t == pytest.approx(0.7 * math.sqrt(1 / (1 - float(sigmas[1]))))
    assert std_step == pytest.approx(std_t * math.sqrt(-dt))
    # step 1: s = 0.8577 -> std_t = 0.7 sqrt(0.8577 / 0.1423)
    _, _, std_t1, _ = sde_coefficients(sigmas, 1, 0.7)
    assert std_t1 == pytest.approx(0.7 * math.sqrt(float(sigmas[1]) / (1 - float(sigmas[1]))))


def test_children_share_the_mean_with_the_stated_std(sigmas):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    out = sde_step_with_logprob(x, v, sigmas, 1, noise_level=0.7, k=512, generator=g)
    resid = out.sample - out.mean.unsqueeze(1)  # [1, 512, 16, 8, 8]: 524k draws
    assert resid.mean().abs() < 0.01 * out.std_step
    assert resid.std().item() == pytest.approx(out.std_step, rel=0.01)
    # the mean is the stated formula
    s, dt, std_t, _ = sde_coefficients(sigmas, 1, 0.7)
    mu = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(out.mean, mu)


def test_gradient_flows_only_through_the_mean(sigmas):
    torch.manual_seed(3)
    model = torch.nn.Conv2d(16, 16, 1)
    x = torch.randn(2, 16, 4, 4)
    v = model(x)
    out = sde_step_with_logprob(x, v, sigmas, 1, 0.7, k=4, generator=torch.Generator().manual_seed(0))
    assert not out.sample.requires_grad and out.log_prob.requires_grad
    grad_v, = torch.autograd.grad(out.log_prob.sum(), v, retain_graph=True)
    # d logp / d v = d logp / d mu * d mu / d v, with d mu / d v = (1 + std_t^2 (1 - s) / (2 s)) dt
    s, dt, std_t, std_step = sde_coefficients(sigmas, 1, 0.7)
    dlogp_dmu = ((out.sample - out.mean.unsqueeze(1)) / std_step**2).sum(1) / (16 * 4 * 4)
    torch.testing.assert_close(grad_v, dlogp_dmu * (1 + std_t**2 * (1 - s) / (2 * s)) * dt)
    # children given from outside carry no gradient either, even if they required one
    given = out.sample.clone().requires_grad_(True)
    again = sde_step_with_logprob(x, v, sigmas, 1, 0.7, children=given)
    again.log_prob.sum().backward()
    assert given.grad is None and model.weight.grad is not None


def test_per_item_generators_make_noise_batch_independent(sigmas):
    x, v = torch.zeros(2, 16, 4, 4), torch.zeros(2, 16, 4, 4)
    both = sde_step_with_logprob(x, v, sigmas, 1, 0.7, k=2,
                                 generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    alone = sde_step_with_logprob(x[1:], v[1:], sigmas, 1, 0.7, k=2, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(both.sample[1:], alone.sample)


def test_add_noise_and_kl():
    x0, eps = torch.ones(2, 16, 2, 2), torch.zeros(2, 16, 2, 2)
    xs = add_noise(x0, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(xs[0], torch.full_like(xs[0], 0.75)) and torch.allclose(xs[1], torch.zeros_like(xs[1]))
    # (1 - 0)^2 / (2 * 0.5^2) = 2 for every element
    kl = gaussian_kl(torch.ones(3, 16, 2, 2), torch.zeros(3, 16, 2, 2), 0.5)
    torch.testing.assert_close(kl, torch.full((3,), 2.0))
    assert gaussian_log_prob(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 1.0).item() == pytest.approx(
        -0.5 * math.log(2 * math.pi))


def test_per_item_mean_matches_the_single_step_formula(sigmas):
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    steps = torch.tensor([0, 2, 1])
    from drm_ray.diffusion.flow import sde_mean_per_item

    mean, std_t, std_step = sde_mean_per_item(x, v, sigmas, steps, 0.7)
    for b, i in enumerate(steps.tolist()):
        ref = sde_step_with_logprob(x[b:b + 1], v[b:b + 1], sigmas, i, 0.7, k=2, generator=g)
        torch.testing.assert_close(mean[b:b + 1], ref.mean)
        assert std_t[b].item() == pytest.approx(ref.std_t, rel=1e-6)
        assert std_step[b].item() == pytest.approx(ref.std_step, rel=1e-6)
        lp = gaussian_log_prob(ref.sample, mean[b:b + 1].unsqueeze(1), std_step[b])
        torch.testing.assert_close(lp, ref.log_prob)
