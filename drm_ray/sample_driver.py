"""Driver side of (Step-wise) sampling: the per-prompt seed plan, batches, and running them in-process or on Ray.

Ray layout: `StepwiseSampler` actors (transformer + VAE) and `RewardScorer` actors (the rewards that select) are
separate actors with the same resources (`rollout.num_gpus`, `rollout.num_cpus`), plus one judge `RewardScorer` when
judges are configured; sampler i sends its children to scorer i mod M. The prompt table is encoded once and shared
through the object store; requests name prompts by index. All
batches are submitted at once, round-robin over the samplers (an actor runs its calls in order), then collected as
they finish; every wait gives up after `timeout_s` with an error saying what was outstanding. Batches are formed
before they are spread, and every item carries its own seed, so the images do not depend on the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from drm_ray.workers.sampler import RemoteScorer, SampleBatch, StepwiseSampler


@dataclass(frozen=True)
class SampleItem:
    prompt: str
    prompt_index: int   # the row of the prompt table, and the diversity group
    replica: int        # 0 .. seeds_per_prompt - 1
    seed: int


def plan_items(prompts: list[str], seeds_per_prompt: int, base_seed: int) -> list[SampleItem]:
    """Prompt-major items; seed = base_seed + replica * len(prompts) + prompt index.

    Replica 0 keeps the seed `base_seed + prompt index` of a one-seed run, so adding seeds adds images without
    changing the first ones.
    """
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    n = len(prompts)
    return [SampleItem(p, i, r, base_seed + r * n + i) for i, p in enumerate(prompts) for r in range(seeds_per_prompt)]


def make_batches(n_items: int, batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(lo, min(lo + batch_size, n_items))) for lo in range(0, n_items, batch_size)]


def sample_local(sampler: StepwiseSampler, items: list[SampleItem], batch_size: int) -> list[SampleBatch]:
    return [sampler.sample([items[i].prompt_index for i in idx], [items[i].seed for i in idx], idx)
            for idx in make_batches(len(items), batch_size)]


# ---------------------------------------------------------------------------------------------- Ray


def init_ray() -> str:
    from drm_ray.runtime import init_ray as join_or_start

    return join_or_start()


def start_actors(sampler_kwargs: dict, prompts_ref, scorer_kwargs: dict | None, judge_kwargs: dict | None = None, *,
                 num_workers: int, num_scorers: int, num_cpus: float, num_gpus: float, timeout_s: float,
                 torch_threads: int = 1) -> tuple[list, list]:
    """`num_workers` sampler actors, `num_scorers` reward scorer actors (with `scorer_kwargs`, see
    `drm_ray.workers.scorer.scorer_kwargs`) and a judge actor (with `judge_kwargs`), ready: (samplers, the others)."""
    import ray

    from drm_ray.workers.scorer import RewardScorer

    if num_workers < 1 or num_scorers < 1:
        raise ValueError(f"need at least one worker and one scorer, got workers={num_workers}, "
                         f"scorers={num_scorers}")
    opts = dict(num_cpus=num_cpus, num_gpus=num_gpus)
    table = prompts_ref  # a top-level reference: Ray hands each actor the table (these actors are not restarted)
    scorer_cls = ray.remote(**opts)(RewardScorer)
    scorers = [] if scorer_kwargs is None else [
        scorer_cls.remote(prompts=table, torch_threads=torch_threads, **scorer_kwargs)
        for _ in range(num_scorers)]
    judge = None if judge_kwargs is None else scorer_cls.remote(prompts=table, torch_threads=torch_threads,
                                                                **judge_kwargs)
    others = scorers + ([judge] if judge is not None else [])
    sampler_cls = ray.remote(**opts)(StepwiseSampler)
    workers = [sampler_cls.remote(**sampler_kwargs, prompts=table, torch_threads=torch_threads,
                                  scorer=RemoteScorer(scorers[i % len(scorers)], timeout_s) if scorers else None,
                                  judges=RemoteScorer(judge, timeout_s) if judge is not None else None)
               for i in range(num_workers)]
    try:
        ray.get([a.ready.remote() for a in workers + others], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        stop_actors(workers + others)
        raise TimeoutError(f"{num_workers} sampler and {len(others)} scorer actors (each num_gpus={num_gpus}, "
                           f"num_cpus={num_cpus}) were not ready within rollout.timeout_s={timeout_s:g}s; "
                           "actors asking for GPUs the cluster lacks wait forever") from err
    except Exception:
        stop_actors(workers + others)
        raise
    return workers, others


def sample_on_ray(workers: list, items: list[SampleItem], batch_size: int, timeout_s: float) -> list[SampleBatch]:
    """Submit every batch (round-robin over `workers`), then collect them as they finish, in plan order."""
    import ray

    if not workers:
        raise ValueError("sample_on_ray needs at least one sampler actor")
    owner = {}
    for b, idx in enumerate(make_batches(len(items), batch_size)):
        ref = workers[b % len(workers)].sample.remote([items[i].prompt_index for i in idx],
                                                      [items[i].seed for i in idx], idx)
        owner[ref] = b % len(workers)
    pending, done = list(owner), []
    while pending:
        # One wait over all outstanding work; the timeout bounds the time between two finished batches.
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if not ready:
            busy = sorted({owner[r] for r in pending})
            raise TimeoutError(f"no sampling batch finished within rollout.timeout_s={timeout_s:g}s "
                               f"({len(pending)} of {len(owner)} batches outstanding on workers {busy})")
        done.append(ray.get(ready[0], timeout=timeout_s))  # finished: returns at once
    return sorted(done, key=lambda batch: batch.index[0])


def stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)
