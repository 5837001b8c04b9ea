import math

import pytest
import torch

from drm_ray.algorithms.advantages import combine_rewards, grpo_advantages, step_group_advantages
from drm_ray.algorithms.losses import clipped_policy_loss


def test_step_group_advantages_by_hand():
    # group [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.8165 -> A = [-1.2245, 0, 1.2245]
    scores = torch.tensor([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])  # [G=1, S=2, k=3]
    adv, valid, stats = step_group_advantages(scores)
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(adv[0, 0], torch.tensor([-1 / (s + 1e-4), 0.0, 1 / (s + 1e-4)]))
    assert torch.equal(adv[0, 1], torch.zeros(3))  # all-equal group: zero advantages, not NaN
    assert valid.all() and stats["adv/zero_std_frac"] == 0.5 and not torch.isnan(adv).any()


def test_clip_and_non_finite_groups_are_dropped():
    scores = torch.tensor([[0.0, 0.0, 0.0, 1000.0], [1.0, float("nan"), 2.0, 3.0], [1.0, float("inf"), 0.0, 0.0]])
    adv, valid, stats = step_group_advantages(scores, clip=1.5)
    # group 0: mean 250, std 433.0 -> A = [-0.577, -0.577, -0.577, 1.732] -> clipped to 1.5
    assert adv[0, 3].item() == pytest.approx(1.5) and adv[0, 0].item() == pytest.approx(-250 / (433.0127 + 1e-4),
                                                                                        rel=1e-4)
    assert valid.tolist() == [True, False, False] and stats["adv/dropped_groups"] == 2
    assert torch.isfinite(adv).all() and torch.equal(adv[1:], torch.zeros(2, 4))


def test_grpo_advantages_repeat_over_steps():
    adv, valid, _ = grpo_advantages(torch.tensor([[0.0, 2.0]]), num_steps=3)
    assert adv.shape == (1, 3, 2) and valid.shape == (1, 3)
    for i in range(3):  # mean 1, std 1 -> [-1, 1] / (1 + 1e-4)
        torch.testing.assert_close(adv[0, i], torch.tensor([-1.0, 1.0]) / (1 + 1e-4))


def test_mean_normalization_only_centres_by_hand():
    # group [1, 2, 6]: mean 3 -> A = [-2, -1, 3]; group [0.5, 0.51]: mean 0.505 -> [-0.005, 0.005], not scaled up to
    # [-1, 1] as "std" does (a hair's difference counts as a hair); clip 2.5 caps the 3
    scores = torch.tensor([[[1.0, 2.0, 6.0]], [[0.5, 0.51, 0.505]]])  # [G=2, S=1, k=3]
    adv, valid, stats = step_group_advantages(scores, clip=2.5, norm="mean")
    torch.testing.assert_close(adv[0, 0], torch.tensor([-2.0, -1.0, 2.5]))
    torch.testing.assert_close(adv[1, 0], torch.tensor([-0.005, 0.005, 0.0]), atol=1e-6, rtol=0)
    std_adv, _, _ = step_group_advantages(scores, clip=2.5)
    assert std_adv[1, 0, 1].item() == pytest.approx(0.005 / (math.sqrt(0.005 ** 2 * 2 / 3) + 1e-4), rel=1e-4)
    g, _, _ = grpo_advantages(torch.tensor([[0.0, 0.2]]), num_steps=2, norm="mean")
    torch.testing.assert_close(g[0], torch.tensor([[-0.1, 0.1], [-0.1, 0.1]]))
    with pytest.raises(ValueError, match="advantage normalization 'max'"):
        step_group_advantages(scores, norm="max")


def test_two_rewards_combine_at_the_advantage_level_by_hand():
    # one group of k=2: reward a = [0, 10] -> A_a = [-1, 1] / (5 + 1e-4) * 5; reward b = [0.3, 0.1] -> A_b = [1, -1]
    # (each normalized by its own std, so b's 100x smaller scale does not matter); weights 3 and 1 -> (3 A_a + A_b) / 4
    scores = torch.tensor([[[0.0, 0.3], [10.0, 0.1]]])  # [G=1, k=2, R=2]
    adv, valid, stats = combine_rewards(scores, [3.0, 1.0])
    a = torch.tensor([-5.0, 5.0]) / (5 + 1e-4)
    b = torch.tensor([0.1, -0.1]) / (0.1 + 1e-4)
    torch.testing.assert_close(adv[0], (3 * a + b) / 4)
    assert valid.tolist() == [True] and stats["adv/dropped_groups"] == 0
    # one reward: exactly the single-reward advantages, whatever its weight
    one, _, _ = combine_rewards(scores[..., :1], [7.0])
    torch.testing.assert_close(one, step_group_advantages(scores[..., 0])[0])
    # a non-finite score in either reward drops the group; a group flat in every reward has zero std
    bad = torch.tensor([[[0.0, 1.0], [1.0, float("nan")]], [[2.0, 5.0], [2.0, 5.0]]])  # [G=2, k=2, R=2]
    adv, valid, stats = combine_rewards(bad, [1.0, 1.0])
    assert valid.tolist() == [False, True] and torch.equal(adv, torch.zeros(2, 2))
    assert stats["adv/dropped_groups"] == 1 and stats["adv/zero_std_frac"] == 1.0


def test_clipped_loss_on_policy_and_clipping_by_hand():
    adv = torch.tensor([[1.0, -1.0]])
    lp = torch.tensor([[-0.3, -0.7]], requires_grad=True)
    loss, stats = clipped_policy_loss(lp, lp.detach(), adv, clip_eps=0.2)
    # on-policy: rho = 1, loss = -A
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 1.0]]))
    assert torch.equal(stats["ratio"], torch.ones(1, 2)) and stats["clipped"].sum() == 0
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, 1.0]]))  # d(-A rho)/d logp = -A rho
    # rho = e^0.5 = 1.6487 > 1.2 with A = 1: max(-1.6487, -1.2) = -1.2 (clipped, no gradient)
    new = torch.tensor([[0.5]], requires_grad=True)
    loss, stats = clipped_policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clipped"].item() == 1.0
    loss.sum().backward()
    assert new.grad.item() == 0.0


def test_spearman_by_hand_with_ties_and_edge_cases():
    from drm_ray.algorithms.ranking import spearman

    # ranks [1..5] vs [1, 2, 3.5, 5, 3.5]: centred products sum to 8, squares to 10 and 9.5 -> 8 / sqrt(95)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # any increasing map
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, float("nan"), 3, 4], [1, 2, 0, 3, 5]) == pytest.approx(1.0)  # the NaN pair is left out
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_step_reward_predictiveness_uses_the_continued_child():
    from types import SimpleNamespace

    from drm_ray.algorithms.rl_batch import reward_stats

    # 4 groups, 2 branching steps, k=3. Step 0: the continued child's score ranks the finals exactly; step 1: the
    # continued child's score ranks them in reverse, while the children not continued say the opposite
    finals = torch.tensor([[0.1], [0.4], [0.2], [0.9]])  # [G, 1]
    chosen = [torch.tensor([2, 0]), torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 0])]
    child = []
    for g, pick in enumerate(chosen):
        c = torch.full((2, 3), float(finals[g, 0]))  # the children not continued: a perfect predictor
        c[0, pick[0]] = 10 * finals[g, 0]  # continued at step 0: same order as the finals
        c[1, pick[1]] = -finals[g, 0]  # continued at step 1: reversed
        child.append(c)
    rollouts = [SimpleNamespace(chosen=p) for p in chosen]
    stats = reward_stats(rollouts, "step_grpo", child, finals, (0, 1))
    assert stats["reward/step0_final_spearman"] == pytest.approx(1.0)
    assert stats["reward/step1_final_spearman"] == pytest.approx(-1.0)
