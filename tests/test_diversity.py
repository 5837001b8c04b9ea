import pytest
import torch

from drm_ray.diversity import pairwise_one_minus_ssim, pairwise_rms, prompt_diversity, ssim


def test_identical_images_have_zero_diversity():
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = img.expand(3, -1, -1, -1)
    assert float(pairwise_rms(same)) == pytest.approx(0.0, abs=1e-6)
    assert float(pairwise_one_minus_ssim(same)) == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_values():
    black, white, grey = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    # RMS: black-white 1, black-grey 0.5, white-grey 0.5 -> mean 2/3.
    assert float(pairwise_rms(torch.cat([black, white, grey]))) == pytest.approx(2 / 3, rel=1e-5)
    # Flat images: variances and covariance are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1);
    # black vs white: C1 / (1 + C1) = 1e-4 / 1.0001.
    assert float(ssim(black, white)) == pytest.approx(1e-4 / 1.0001, rel=1e-4)


def test_more_different_images_score_higher():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 3, 32, 32, generator=g)
    figures = []
    for amp in (0.02, 0.1, 0.3):
        pair = torch.cat([base, (base + amp * noise).clamp(0, 1)])
        figures.append(prompt_diversity(pair, [0, 0]))
    for key in ("diversity/pairwise_rms", "diversity/one_minus_ssim"):
        values = [f[key] for f in figures]
        assert 0 < values[0] < values[1] < values[2], (key, values)


def test_groups_are_compared_only_within_a_prompt():
    a, b = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    # Two prompts, each with two identical images, very different across prompts: diversity 0.
    out = prompt_diversity(torch.cat([a, a, b, b]), [0, 0, 1, 1])
    assert out["diversity/pairwise_rms"] == pytest.approx(0.0, abs=1e-6)
    assert out["diversity/one_minus_ssim"] == pytest.approx(0.0, abs=1e-6)
    # A prompt with one image is skipped; the other prompt decides.
    out = prompt_diversity(torch.cat([a, a, b]), [0, 1, 1])
    assert out["diversity/pairwise_rms"] == pytest.approx(1.0)


def test_rejects_sets_without_repeated_prompts():
    with pytest.raises(ValueError, match="two or more images"):
        prompt_diversity(torch.zeros(2, 3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match="one prompt per image"):
        prompt_diversity(torch.zeros(2, 3, 8, 8), [0])
