"""Benchmark: how many rollouts does one policy-gradient update need before it points somewhere? (toy world)

    python bench/gradient_snr.py --model outputs/w2/pretrained                      # GRPO vs Step-GRPO, oracle reward
    python bench/gradient_snr.py --model outputs/w2/pretrained --groups 128 --set "grpo.branch_steps=[0,1,2]"

For each algorithm, `--groups` independent prompt groups are sampled by the policy (the real RolloutWorker,
in-process), scored by the reward (the oracle by default: for Step-GRPO each child through its x0_hat, as the RL job
does), turned into advantages by the job's own `learner_batch`, and each group's policy-gradient g_i (the gradient of
the learner's on-policy loss, `state_losses`, with respect to the LoRA, at the update's first step) is computed
separately. With mean g and per-group covariance trace T = sum_i |g_i - g|^2 / (N - 1):

- |mu|^2 = |g|^2 - T / N estimates the squared norm of the expected gradient (unbiased);
- groups for SNR 1 = T / |mu|^2: the batch size at which the update's signal is as large as its noise
  (E|batch mean - mu|^2 = T / n);
- the cosine between the mean gradients of the two halves of the groups (near 0: each half is mostly noise).

Groups are not equal rollout compute across algorithms: a GRPO group is `sampling.k` whole trajectories, a Step-GRPO
group one trajectory with k children at each branching step (drawn from one velocity forward, plus one x0_hat
forward per child for an image reward). The table reports trajectories for SNR 1 (GRPO: k per group; Step-GRPO: 1) and policy
forwards per group, so the two can be put on one scale. The LoRA starts as the job's does (B = 0), so this is the
gradient of the first update. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def group_gradients(cfg, algo: str, groups: int, seed: int, reward: str, chunk: int = 16):
    """[groups, P] per-group LoRA gradients of the first on-policy update, and the policy forwards per group."""
    import torch

    from drm_ray.algorithms.rl_batch import learner_batch, scoring_requests, split_scores
    from drm_ray.data.prompt_table import encode_prompt_table
    from drm_ray.data.prompts import load_prompts
    from drm_ray.models.lora import add_lora
    from drm_ray.models.sd3 import build_components, model_kwargs
    from drm_ray.reward.rewards import RewardSet
    from drm_ray.reward.specs import IMAGE_KINDS, parse_spec
    from drm_ray.rl_setup import update_config
    from drm_ray.workers.learner import state_losses
    from drm_ray.workers.rollout import RolloutWorker

    m, s = cfg.model, cfg.sampling
    kwargs = model_kwargs(m, s)
    prompts = load_prompts(cfg.data.prompts, m.preset)
    table = encode_prompt_table(prompts, s.negative_prompt, m.preset, kwargs)
    specs = [parse_spec(reward)]
    x0 = algo == "step_grpo" and specs[0].kind in IMAGE_KINDS
    worker = RolloutWorker(m.preset, kwargs, cfg.lora_spec(), table, cfg.rollout_sampling(), algo, 1, None, x0)
    rewards = RewardSet(specs, table, preset=m.preset, model_path=m.path, resolution=s.resolution, seed=m.seed,
                        drm_path=cfg.reward.drm_path)
    transformer = build_components(m.preset, text=False, vae=False, **kwargs).transformer
    params = add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.target_modules))
    lcfg = update_config(cfg, 1)
    n_branch = len(cfg.branch_steps())
    per_group = n_branch * (1 if algo == "step_grpo" else s.k)
    rng = np.random.default_rng(seed)
    grads = []
    for start in range(0, groups, chunk):
        n = min(chunk, groups - start)
        batch_groups = [(start + j, int(rng.integers(len(prompts))), seed * 100_000 + start + j) for j in range(n)]
        rollouts = worker.rollout(batch_groups, version=-1)
        lat, lvl, idx, clean = scoring_requests(rollouts, algo, worker.sigmas)
        child, final = split_scores(rollouts, algo, rewards.score(lat, lvl, idx, clean))
        for r, c, f in zip(rollouts, child or [None] * n, final):
            batch, _ = learner_batch([r], algo, [c] if c is not None else [], f[None], n_branch, cfg.grpo.adv_clip,
                                     adv_norm=cfg.grpo.adv_norm)
            transformer.zero_grad(set_to_none=True)
            if batch["states"].shape[0]:  # a group with no reward spread has no valid states: gradient 0
                loss, _ = state_losses(transformer, transformer, batch, table, worker.sigmas, lcfg, on_policy=True)
                (loss.sum() / per_group).backward()
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                    for p in params]).double().numpy())
    # a branching step draws its k children from one velocity forward; an image reward adds an x0_hat forward per child
    forwards = s.num_steps + (s.k * n_branch if x0 else 0) if algo == "step_grpo" else s.k * s.num_steps
    return np.stack(grads), forwards


def snr(grads: np.ndarray, blocks: int = 16) -> dict:
    """Signal and noise of per-group gradients [N, P]: |mu|^2 (unbiased: the mean of g_i . g_j over i != j) with a
    delete-a-block jackknife standard error, the per-group covariance trace T, and groups for SNR 1 = T / |mu|^2
    (with a lower bound T / (|mu|^2 + 2 s.e.) when the signal is not resolved)."""
    n = grads.shape[0]
    gram = grads @ grads.T  # [N, N]

    def mu2(keep: np.ndarray) -> float:
        sub = gram[np.ix_(keep, keep)]
        m = len(keep)
        return float((sub.sum() - np.trace(sub)) / (m * (m - 1)))

    every = np.arange(n)
    est = mu2(every)
    parts = np.array_split(every, blocks)
    jack = np.array([mu2(np.setdiff1d(every, part)) for part in parts])
    se = float(np.sqrt((blocks - 1) / blocks * ((jack - jack.mean()) ** 2).sum()))
    trace = float((np.trace(gram) - gram.sum() / n) / (n - 1))  # sum_i |g_i - mean|^2 / (N - 1)
    a, b = grads[: n // 2].mean(axis=0), grads[n // 2:].mean(axis=0)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    zero = float((np.abs(grads).sum(axis=1) == 0).mean())
    return {"groups": n, "mu2": est, "mu2_se": se, "trace": trace,
            "n_star": trace / est if est > 0 else float("inf"),
            "n_star_low": trace / (est + 2 * se) if est + 2 * se > 0 else float("inf"),
            "half_cos": cos, "zero_groups": zero}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a toy checkpoint (jobs/pretrain_toy.py's model.path)")
    parser.add_argument("--algos", default="grpo,step_grpo")
    parser.add_argument("--groups", type=int, default=128, help="independent prompt groups per algorithm")
    parser.add_argument("--reward", default="oracle", help="what scores the rollouts (a reward.rewards entry)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (toy preset)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--save", default=None, help="a directory for the per-group gradients (<algo>.npy, float32)")
    args = parser.parse_args(argv)
    import torch

    from bench.common import emit_markdown

    from drm_ray.config import load_config

    torch.set_num_threads(1)
    md = [f"# Policy-gradient signal per update, toy policy {args.model}, reward {args.reward}", "",
          f"Overrides: {' '.join(args.set) or '(none)'}. {args.groups} independent groups per algorithm; the first "
          "update's LoRA gradient (B = 0).", "",
          "| algorithm | groups | policy forwards / group | zero-gradient groups | half-batch cosine | "
          "|mu|^2 / T (x 1e-4) | groups for SNR 1 (lower bound) | trajectories for SNR 1 | policy forwards for SNR 1 | "
          "seconds |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for algo in args.algos.split(","):
        cfg = load_config("toy", [f"model.path={args.model}", f"grpo.algo={algo}", *args.set])
        t0 = time.perf_counter()
        grads, forwards = group_gradients(cfg, algo, args.groups, args.seed, args.reward)
        r = snr(grads)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save) / f"{algo}.npy", grads.astype(np.float32))
        per = cfg.sampling.k if algo == "grpo" else 1
        md.append(f"| {algo} | {r['groups']} | {forwards} | {100 * r['zero_groups']:.0f}% | {r['half_cos']:+.3f} | "
                  f"{1e4 * r['mu2'] / r['trace']:+.1f} +- {1e4 * r['mu2_se'] / r['trace']:.1f} | "
                  f"{r['n_star']:.0f} (> {r['n_star_low']:.0f}) | {r['n_star'] * per:.0f} | "
                  f"{r['n_star'] * forwards:.0f} | {time.perf_counter() - t0:.0f} |")
        print(md[-1], flush=True)
    emit_markdown(md, args.out)


if __name__ == "__main__":
    main()
