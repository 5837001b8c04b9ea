import pytest
import torch

from drm_ray.diffusion.flow import schedule_sigmas, sde_step_with_logprob
from drm_ray.diffusion.sampling import denoise, initial_latents, predict_velocity
from drm_ray.diffusion.stepwise import stepwise_sample
from drm_ray.models.sd3 import encode_prompts

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS = [10, 11, 12]
W = 4.5


@pytest.fixture(scope="module")
def cond(tiny):
    embeds, pooled = encode_prompts(tiny, PROMPTS, 32)
    neg, neg_pooled = encode_prompts(tiny, [""], 32)
    return embeds, pooled, neg.expand(len(PROMPTS), -1, -1), neg_pooled.expand(len(PROMPTS), -1)


def channel0_scorer(calls=None):
    """Prefers a high mean of latent channel 0; records every call."""
    def score(latents, levels, rows):
        if calls is not None:
            calls.append((latents.clone(), levels.clone(), rows.clone()))
        return latents[:, 0].mean(dim=(-2, -1))  # [N]
    return score


def refusing_scorer(*args):
    raise AssertionError("the scorer must not be called")


def run(tiny, cond, idx, k, noise_level=0.7, scorer=None, steps=4):
    embeds, pooled, neg, neg_pooled = (t[idx] for t in cond)
    gens = [torch.Generator().manual_seed(SEEDS[i]) for i in idx]
    x1 = initial_latents(len(idx), 16, 8, gens)
    sigmas = schedule_sigmas(tiny.scheduler, steps)
    return stepwise_sample(tiny.transformer, sigmas, embeds, pooled, x1, k=k, noise_level=noise_level,
                           generator=gens, scorer=scorer, neg_embeds=neg, neg_pooled=neg_pooled, guidance_scale=W)


def plain(tiny, cond, idx, noise_level, steps=4):
    embeds, pooled, neg, neg_pooled = (t[idx] for t in cond)
    gens = [torch.Generator().manual_seed(SEEDS[i]) for i in idx]
    x1 = initial_latents(len(idx), 16, 8, gens)
    return denoise(tiny.transformer, schedule_sigmas(tiny.scheduler, steps), embeds, pooled, neg, neg_pooled, W,
                   noise_level, x1, gens)


def test_k1_is_plain_sde_sampling_bit_for_bit(tiny, cond):
    res = run(tiny, cond, [0, 1], k=1, scorer=refusing_scorer)
    assert torch.equal(res.latents, plain(tiny, cond, [0, 1], 0.7))
    assert res.scores.shape == (2, 3) and res.scores.isnan().all() and (res.chosen == 0).all()


def test_noise_level_0_is_ode_sampling(tiny, cond):
    res = run(tiny, cond, [0, 1], k=3, noise_level=0.0, scorer=channel0_scorer())
    assert torch.equal(res.latents, plain(tiny, cond, [0, 1], 0.0))
    assert (res.spread == 0).all()  # identical children score identically


def test_selects_the_argmax_child_in_one_batched_call_per_step(tiny, cond):
    calls, k, idx = [], 4, [0, 1]
    res = run(tiny, cond, idx, k=k, scorer=channel0_scorer(calls))
    sigmas = schedule_sigmas(tiny.scheduler, 4)
    assert len(calls) == 3  # one call per branching step (4 steps, the last is Euler)
    embeds, pooled, neg, neg_pooled = (t[idx] for t in cond)
    for i, (lat, levels, rows) in enumerate(calls):
        assert lat.shape == (2 * k, 16, 8, 8) and torch.equal(levels, sigmas[i + 1].expand(2 * k))
        assert rows.tolist() == [0] * k + [1] * k  # child-major per prompt: the caller maps rows to its prompts

    # Recompute independently: same generators, shared mean, k children, keep the highest channel-0 mean.
    gens = [torch.Generator().manual_seed(SEEDS[i]) for i in idx]
    x = initial_latents(2, 16, 8, gens)
    for i in range(3):
        v = predict_velocity(tiny.transformer, x, float(sigmas[i]), embeds, pooled, neg, neg_pooled, W)
        children = sde_step_with_logprob(x, v, sigmas, i, 0.7, k=k, generator=gens).sample  # [2, k, 16, 8, 8]
        assert torch.equal(children.flatten(0, 1), calls[i][0])
        r = children[:, :, 0].mean(dim=(-2, -1))  # [2, k]
        assert torch.equal(res.chosen[:, i], r.argmax(1))
        torch.testing.assert_close(res.scores[:, i], r.max(1).values)
        torch.testing.assert_close(res.spread[:, i], r.max(1).values - r.min(1).values)
        torch.testing.assert_close(res.score_std[:, i], r.std(1, correction=0))
        x = children[torch.arange(2), r.argmax(1)]
    v = predict_velocity(tiny.transformer, x, float(sigmas[3]), embeds, pooled, neg, neg_pooled, W)
    assert torch.equal(res.latents, x + (sigmas[4] - sigmas[3]) * v)
    assert len(set(res.chosen.flatten().tolist())) > 1  # the selection is not trivially child 0


def test_selection_raises_the_scorers_preference(tiny, cond):
    one = run(tiny, cond, [0, 1, 2], k=1)
    six = run(tiny, cond, [0, 1, 2], k=6, scorer=channel0_scorer())
    assert six.latents[:, 0].mean() > one.latents[:, 0].mean()
    assert (six.spread > 0).all()


def test_batch_independence(tiny, cond):
    both = run(tiny, cond, [0, 1, 2], k=3, scorer=channel0_scorer())
    alone = [run(tiny, cond, [i], k=3, scorer=channel0_scorer()) for i in range(3)]
    for i, r in enumerate(alone):
        torch.testing.assert_close(r.latents, both.latents[i:i + 1])
        assert torch.equal(r.chosen, both.chosen[i:i + 1])


def test_rejects_bad_input(tiny, cond):
    with pytest.raises(ValueError, match="scorer is required"):
        run(tiny, cond, [0], k=2)
    with pytest.raises(ValueError, match="k must be"):
        run(tiny, cond, [0], k=0)
    with pytest.raises(ValueError, match=r"scorer must return a tensor of shape \[2\]"):
        run(tiny, cond, [0], k=2, scorer=lambda lat, *a: lat.mean())
    embeds, pooled, neg, neg_pooled = cond
    with pytest.raises(ValueError, match="one generator per prompt"):
        stepwise_sample(tiny.transformer, schedule_sigmas(tiny.scheduler, 2), embeds, pooled,
                        torch.zeros(3, 16, 8, 8), k=1, noise_level=0.7, generator=[torch.Generator()])
