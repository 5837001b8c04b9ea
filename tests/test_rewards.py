"""The reward interface: score(latents, noise_levels, prompt_index) -> [N] for the DRM, CLIP-family models and
plug-ins, compared with the stock models they wrap."""

import numpy as np
import pytest
import torch

from drm_ray.data.prompt_table import encode_prompt_table
from drm_ray.diffusion.sampling import decode_latents
from drm_ray.models.sd3 import build_tiny
from drm_ray.reward.model import build_drm
from drm_ray.reward.rewards import CallableReward, CLIPReward, DRMReward, RewardSet
from drm_ray.reward.specs import RewardSpec, parse_spec

KWARGS = dict(path=None, dtype="float32", seed=0, num_layers=4, num_attention_heads=2, attention_head_dim=16,
              resolution=64, max_sequence_length=32, shift=3.0)
PROMPTS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def table():
    return encode_prompt_table(PROMPTS, "", "tiny", KWARGS)


@pytest.fixture(scope="module")
def vae():
    return build_tiny(seed=0).vae


@pytest.fixture
def clip_dir(tiny_clip_dir):
    return tiny_clip_dir


def test_specs_parse_kind_and_weight():
    assert parse_spec("drm") == RewardSpec("drm", 1.0)
    assert parse_spec("clip=0.25") == RewardSpec("clip", 0.25)
    with pytest.raises(ValueError, match="unknown reward kind 'pickscore'.*known: drm, oracle, clip, callable"):
        parse_spec("pickscore")
    for bad in ("drm=x", "drm=0", "drm=-1", "drm=nan"):
        with pytest.raises(ValueError, match="weight"):
            parse_spec(bad)
    # a spec may name its own model: one run can hold two of a kind, each named after its source
    pick = parse_spec("clip@/models/PickScore_v1/=0.3")
    assert pick == RewardSpec("clip", 0.3, "/models/PickScore_v1/") and pick.name == "clip-PickScore_v1"
    hps = parse_spec("callable@my_rewards.hps:HPSv3")
    assert hps == RewardSpec("callable", 1.0, "my_rewards.hps:HPSv3") and hps.name == "callable-HPSv3"
    assert parse_spec("drm@runs/drm b").name == "drm-drm_b"  # characters MLflow refuses in a metric name become _
    with pytest.raises(ValueError, match="oracle reward takes no '@source'"):
        parse_spec("oracle@x")
    with pytest.raises(ValueError, match="nothing after '@'"):
        parse_spec("clip@=2")


def test_drm_reward_scores_each_latent_with_its_own_prompt(tmp_path, table):
    drm_dir = tmp_path / "drm"
    drm = build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, seed=3)
    drm.save_pretrained(drm_dir)
    reward = DRMReward(str(drm_dir), table, device="cpu", max_batch=2)  # several batches
    g = torch.Generator().manual_seed(0)
    latents, levels = torch.randn(5, 16, 8, 8, generator=g), torch.rand(5, generator=g)
    index = torch.tensor([2, 0, 2, 1, 0])
    # reference: the DRM module called on each latent's own float16 table row, one latent at a time
    ref = torch.stack([drm(latents[i:i + 1], levels[i:i + 1],
                           torch.from_numpy(table.embeds[j:j + 1].astype(np.float32)),
                           torch.from_numpy(table.pooled[j:j + 1].astype(np.float32)))[0]
                       for i, j in enumerate(index.tolist())])
    torch.testing.assert_close(reward.score(latents, levels, index), ref.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match=r"prompt_index must lie in \[0, 3\)"):
        reward.score(latents[:1], levels[:1], torch.tensor([3]))


def test_clip_reward_equals_the_stock_clip_logits(clip_dir, table, vae):
    from transformers import AutoProcessor, CLIPModel

    reward = CLIPReward(str(clip_dir), table, vae, device="cpu")
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([1, 2, 0])
    got = reward.score(latents, torch.zeros(3), index)
    # reference: the stock CLIPModel forward on the decoded images as PNG-like uint8, logits_per_image's diagonal
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    from drm_ray.diffusion.sampling import decode_latents

    with torch.no_grad():
        pixels = (decode_latents(vae, latents).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        inputs = processor(text=[PROMPTS[i] for i in index.tolist()], images=list(pixels), return_tensors="pt",
                           padding=True)
        logits = model(**inputs).logits_per_image  # [images, texts]
    torch.testing.assert_close(got, logits.diagonal().float(), rtol=1e-4, atol=1e-4)
    assert got.shape == (3,) and got.std() > 0


def test_image_rewards_refuse_noisy_latents_and_name_the_fix(clip_dir, table, vae):
    reward = CLIPReward(str(clip_dir), table, vae, device="cpu")
    with pytest.raises(ValueError, match=r"clip reward scores clean images, but 1 of 2 .*x0_hat = x_s - s \* v"):
        reward.score(torch.randn(2, 16, 8, 8), torch.tensor([0.0, 0.5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reward.clip_path=.*not a CLIPModel directory"):
        CLIPReward(str(clip_dir.parent), table, vae)


def test_callable_rewards_get_uint8_images_and_prompt_texts(table, vae):
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 2, 2])
    got = CallableReward("reward_plugins:brightness", table, vae).score(latents, torch.zeros(3), index)
    from drm_ray.diffusion.sampling import decode_latents

    with torch.no_grad():
        pixels = (decode_latents(vae, latents) * 255).round()  # [N, 3, H, W]
    ref = pixels.flatten(1).mean(1) + torch.tensor([len(PROMPTS[i]) for i in index.tolist()], dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    counter = CallableReward("reward_plugins:Counter", table, vae)  # a class: built once, then called
    counter.score(latents, torch.zeros(3), index)
    assert counter.score(latents, torch.zeros(3), index).tolist() == [2.0, 2.0, 2.0]
    for target, message in (("reward_plugins", "must look like 'package.module:function'"),
                            ("reward_plugins:missing", "cannot be loaded"),
                            ("no_such_module:f", "cannot be loaded")):
        with pytest.raises(ValueError, match=message):
            CallableReward(target, table, vae)
    with pytest.raises(ValueError, match="non-finite scores"):
        CallableReward("reward_plugins:one_nan", table, vae).score(latents, torch.zeros(3), index)
    with pytest.raises(ValueError, match=r"returned shape \(2,\) for 3 images"):
        CallableReward("reward_plugins:too_few", table, vae).score(latents, torch.zeros(3), index)


def test_reward_set_columns_and_weighted_sum(tmp_path, clip_dir, table):
    drm_dir = tmp_path / "drm"
    build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, seed=3).save_pretrained(drm_dir)
    specs = [parse_spec("drm=2"), parse_spec("clip=0.5"), parse_spec("callable")]
    rewards = RewardSet(specs, table, preset="tiny", drm_path=str(drm_dir), clip_path=str(clip_dir),
                        callable_target="reward_plugins:brightness")
    latents, index = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0])
    cols = rewards.score_all(latents, torch.zeros(4), index)
    assert rewards.names == ["drm", "clip", "callable"] and cols.shape == (4, 3)
    alone = [RewardSet([RewardSpec(k)], table, preset="tiny", drm_path=str(drm_dir), clip_path=str(clip_dir),
                       callable_target="reward_plugins:brightness").score(latents, torch.zeros(4), index)
             for k in ("drm", "clip", "callable")]
    for j in range(3):
        torch.testing.assert_close(cols[:, j], alone[j])
    torch.testing.assert_close(rewards.score(latents, torch.zeros(4), index),
                               2 * alone[0] + 0.5 * alone[1] + alone[2])
    with pytest.raises(ValueError, match="each reward may appear once"):
        RewardSet([RewardSpec("drm"), RewardSpec("drm", 2.0)], table, preset="tiny", drm_path=str(drm_dir))
    # two DRMs and two callables, the second of each named by its source: each column is that model alone
    other = tmp_path / "drm_b"
    build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, seed=4).save_pretrained(other)
    two = RewardSet([parse_spec(x) for x in ("drm", f"drm@{other}", "callable", "callable@reward_plugins:Counter")],
                    table, preset="tiny", drm_path=str(drm_dir), callable_target="reward_plugins:brightness")
    assert two.names == ["drm", "drm-drm_b", "callable", "callable-Counter"]
    cols = two.score_all(latents, torch.zeros(4), index)
    alone_b = RewardSet([RewardSpec("drm")], table, preset="tiny", drm_path=str(other)).score(latents, torch.zeros(4),
                                                                                             index)
    torch.testing.assert_close(cols[:, 0], alone[0])
    torch.testing.assert_close(cols[:, 1], alone_b)
    assert not torch.allclose(alone_b, alone[0])  # a different DRM, not the first one twice
    torch.testing.assert_close(cols[:, 2], alone[2])
    assert cols[:, 3].tolist() == [1.0] * 4  # the Counter's first call
    with pytest.raises(ValueError, match="needs reward.drm_path"):
        RewardSet([RewardSpec("drm")], table, preset="tiny")
    with pytest.raises(ValueError, match="needs reward.clip_path"):
        RewardSet([RewardSpec("clip")], table, preset="tiny")
    with pytest.raises(ValueError, match="oracle reward grades toy-world images"):
        RewardSet([RewardSpec("oracle")], table, preset="tiny")


def test_rollouts_carry_each_childs_x0_hat_for_image_rewards(table):
    """x0_hat of a child at noise level s is one deterministic (Euler) step from s to 0 under the policy; the
    rollout is otherwise unchanged, and scoring_requests hands image rewards x0_hat for children, the final latent
    for finals."""
    from drm_ray.algorithms.rl_batch import scoring_requests
    from drm_ray.config import SD3_LORA_TARGETS
    from drm_ray.diffusion.sampling import denoise
    from drm_ray.workers.rollout import RolloutWorker

    sampling = dict(num_steps=3, guidance_scale=4.5, noise_level=0.7, k=2, branch_steps=[0, 1],
                    continuation="random")
    lora = dict(rank=4, alpha=8.0, target_modules=list(SD3_LORA_TARGETS))
    plain = RolloutWorker("tiny", KWARGS, lora, table, sampling)
    worker = RolloutWorker("tiny", KWARGS, lora, table, sampling, x0_children=True)
    groups = [(0, 2, 11), (1, 0, 12)]
    (a, b), (c, d) = plain.rollout(groups, version=-1), worker.rollout(groups, version=-1)
    assert a.children_x0 is None and torch.equal(a.children, c.children) and torch.equal(a.final, c.final)
    for r, g in ((c, 2), (d, 0)):
        assert r.children_x0.shape == r.children.shape  # [S, k, C, h, w]
        e, p, ne, npool = table.rows([g] * 2)
        for j, step in enumerate(r.step_index.tolist()):
            s = worker.sigmas[step + 1]
            ref = denoise(worker.transformer, torch.stack([s, torch.zeros(())]), e, p, ne, npool, 4.5, 0.0,
                          r.children[j])
            torch.testing.assert_close(r.children_x0[j], ref, rtol=1e-5, atol=1e-5)
    lat, lvl, idx, clean = scoring_requests([c, d], "step_grpo", worker.sigmas)
    assert clean.shape == lat.shape and torch.equal(clean[4], c.final[0]) and torch.equal(clean[:4],
                                                                                            c.children_x0.flatten(0, 1))
    assert scoring_requests([a, b], "step_grpo", worker.sigmas)[3] is None


@pytest.mark.slow
def test_continuation_best_continues_from_the_child_its_scorer_ranks_first(ray_session, table):
    """continuation=best through a real RewardScorer actor with an image reward: each step's children are scored on
    their x0_hat (made once and kept in the record), the trajectory continues from the child the reward ranks first,
    and a scorer that does not answer fails the rollout within rollout.timeout_s, naming it."""
    import ray

    from drm_ray.config import SD3_LORA_TARGETS
    from drm_ray.diffusion.sampling import denoise
    from drm_ray.workers.rollout import RolloutWorker
    from drm_ray.workers.scorer import RewardScorer

    sampling = dict(num_steps=3, guidance_scale=4.5, noise_level=0.7, k=3, branch_steps=[0, 1], continuation="best")
    lora = dict(rank=4, alpha=8.0, target_modules=list(SD3_LORA_TARGETS))
    actor = ray.remote(RewardScorer).options(num_cpus=0)
    common = dict(specs=["callable"], prompts=table, preset="tiny", resolution=64, seed=0)
    scorer = actor.remote(**common, callable_target="reward_plugins:brightness")
    worker = RolloutWorker("tiny", KWARGS, lora, table, sampling, scorer=scorer, x0_children=True, timeout_s=120)
    records = worker.rollout([(0, 2, 11), (1, 0, 12)], version=-1)
    local = RewardSet([RewardSpec("callable")], table, preset="tiny", callable_target="reward_plugins:brightness")
    for r, prompt in zip(records, (2, 0)):
        e, p, ne, npool = table.rows([prompt] * 3)
        for j, step in enumerate(r.step_index.tolist()):
            s = worker.sigmas[step + 1]
            x0 = denoise(worker.transformer, torch.stack([s, torch.zeros(())]), e, p, ne, npool, 4.5, 0.0,
                         r.children[j])  # one Euler step to 0 of each of the k children
            torch.testing.assert_close(r.children_x0[j], x0, rtol=1e-5, atol=1e-5)
            assert int(r.chosen[j]) == int(local.score(x0, torch.zeros(3), torch.tensor([prompt] * 3)).argmax())
        assert torch.equal(r.states[1], r.children[0, int(r.chosen[0])])  # step 1 starts from step 0's pick
    stuck = actor.remote(**common, callable_target="reward_plugins:slow")
    late = RolloutWorker("tiny", KWARGS, lora, table, sampling, scorer=stuck, x0_children=True, timeout_s=3)
    with pytest.raises(TimeoutError, match=r"did not answer within rollout.timeout_s=3s \(continuation=best\)"):
        late.rollout([(0, 2, 11)], version=-1)
    for a in (scorer, stuck):
        ray.kill(a)


def test_stepwise_sampler_selects_by_a_drm_and_an_image_reward_on_x0_hat(tmp_path, table):
    """Step-wise Sampling with two rewards, the DRM on the noisy children and a plug-in on their x0_hat (one Euler
    step to 0, one policy forward per child, counted), combined as RL combines them (each standardized over the k
    children, then weighted): the same images and choices as stepwise_sample driven by that selection by hand."""
    from drm_ray.algorithms.advantages import combine_rewards
    from drm_ray.diffusion.sampling import denoise, initial_latents
    from drm_ray.diffusion.stepwise import stepwise_sample
    from drm_ray.workers.sampler import StepwiseSampler
    from drm_ray.workers.scorer import RewardScorer

    drm_dir = tmp_path / "drm"
    build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, seed=3).save_pretrained(drm_dir)
    scorer = RewardScorer(["drm", "callable=0.5"], table, preset="tiny", resolution=64, seed=0,
                          drm_path=str(drm_dir), callable_target="reward_plugins:brightness")
    sampler = StepwiseSampler("tiny", KWARGS, table, num_steps=3, k=3, noise_level=0.7, guidance_scale=4.5,
                              scorer=scorer)
    prompts, seeds = [2, 0], [5, 6]
    got = sampler.sample(prompts, seeds, [0, 1])
    assert got.x0_forwards == 2 * 2 * 3  # prompts x steps with children (the last step is plain Euler) x k

    transformer, pidx = sampler.comps.transformer, torch.tensor(prompts)
    conds = table.rows(prompts)
    drm, plugin = scorer.rewards.models

    sums = []  # each step's DRM + 0.5 x plug-in of every child: the record keeps the chosen child's

    def by_hand(children, levels, rows):
        e, p, ne, npool = (c[rows] for c in conds)
        x0 = denoise(transformer, torch.stack([levels[0], torch.zeros(())]), e, p, ne, npool, 4.5, 0.0, children)
        cols = torch.stack([drm.score(children, levels, pidx[rows]),
                            plugin.score(x0, torch.zeros(len(rows)), pidx[rows])], dim=1)
        sums.append((cols[:, 0] + 0.5 * cols[:, 1]).view(2, 3))
        return combine_rewards(cols.view(2, 3, 2), [1.0, 0.5], clip=float("inf"))[0].flatten()

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x1 = initial_latents(2, 16, 8, gens)
    ref = stepwise_sample(transformer, sampler.sigmas, conds[0], conds[1], x1, k=3, noise_level=0.7, generator=gens,
                          scorer=by_hand, neg_embeds=conds[2], neg_pooled=conds[3], guidance_scale=4.5)
    assert np.array_equal(got.chosen, ref.chosen.numpy())
    chosen_sums = torch.stack([sums[j][torch.arange(2), ref.chosen[:, j]] for j in range(2)], dim=1)
    torch.testing.assert_close(torch.from_numpy(got.step_scores), chosen_sums, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got.spread), torch.stack([s.amax(1) - s.amin(1) for s in sums], 1),
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = (decode_latents(sampler.comps.vae, ref.latents).permute(0, 2, 3, 1).numpy() * 255).round()
    assert np.abs(got.images.astype(float) - expected).max() <= 1
    # the image reward takes part: selecting by the DRM alone picks other children here
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # the same x_1 and SDE draws as above
    alone = stepwise_sample(transformer, sampler.sigmas, conds[0], conds[1], initial_latents(2, 16, 8, gens), k=3,
                            noise_level=0.7, generator=gens,
                            scorer=lambda c, lv, rows: drm.score(c, lv, pidx[rows]), neg_embeds=conds[2],
                            neg_pooled=conds[3], guidance_scale=4.5)
    assert not np.array_equal(alone.chosen.numpy(), got.chosen)


def test_overoptimization_flag_is_a_paired_test_of_the_reward_up_and_the_judge_down(capsys):
    """The flag against scipy's paired t statistic (t = mean change / its standard error): reward t > 2 and judge
    t < -2, image by image against the first panel; it sees a fall that the spread across prompts hides."""
    from types import SimpleNamespace

    from scipy.stats import ttest_ind, ttest_rel

    from drm_ray.driver import StepGRPODriver

    rng = np.random.default_rng(0)
    n = 16
    first = {"reward": rng.normal(0, 1, n).tolist(), "clip": rng.normal(1, 1, n).tolist()}  # prompts differ a lot
    driver = SimpleNamespace(eval_history=[], first_panel=None, iteration=0,
                             cfg=SimpleNamespace(grpo=SimpleNamespace(algo="step_grpo")))
    driver.say = lambda line: StepGRPODriver.say(SimpleNamespace(console=None), line)  # no progress bar yet
    assert StepGRPODriver.overoptimization(driver, first) == {"eval/overopt/clip": 0.0}  # the reference itself
    assert driver.first_panel is first

    def flag(reward_shift, judge_shift, noise=0.05):
        now = {"reward": (np.array(first["reward"]) + reward_shift + rng.normal(0, noise, n)).tolist(),
               "clip": (np.array(first["clip"]) + judge_shift + rng.normal(0, noise, n)).tolist()}
        want = (ttest_rel(now["reward"], first["reward"]).statistic > 2
                and ttest_rel(now["clip"], first["clip"]).statistic < -2)
        got = StepGRPODriver.overoptimization(driver, now)["eval/overopt/clip"]
        assert got == float(want)
        return got, now

    got, now = flag(0.2, -0.2)
    assert got == 1.0 and "judge clip fell" in capsys.readouterr().out
    # a fall of 0.2 on prompts whose scores spread by 1: within 2 s.e. of two independent panel means (Welch)
    assert abs(ttest_ind(now["clip"], first["clip"], equal_var=False).statistic) < 2
    assert flag(0.005, -0.2)[0] == 0.0  # the reward moved by less than 2 s.e. of its change
    assert flag(0.2, -0.005)[0] == 0.0  # the judge did
    assert flag(0.2, 0.2)[0] == 0.0 and flag(-0.2, -0.2)[0] == 0.0  # both up; both down
    # a judge missing from the first panel, or a panel of another size, is not compared
    assert StepGRPODriver.overoptimization(driver, {"reward": first["reward"], "pick": first["clip"]}) == {}
    assert StepGRPODriver.overoptimization(driver, {"reward": [1.0] * 4, "clip": [0.0] * 4}) == {}
