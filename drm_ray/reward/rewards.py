"""Rewards: everything that scores a latent, behind one interface.

    reward.score(latents [N, C, h, w], noise_levels [N], prompt_index [N]) -> scores [N] (float32, CPU)

Prompts are named by index into the job's `PromptTable` (embeddings for the DRM, texts for image rewards), so a
request never carries embeddings. Kinds (`reward_kinds()`; a spec string picks one, see `parse_spec`):

- `drm`: R(x_s, s, c) of a trained DRM directory, on latents at any noise level s (the paper's reward).
- image rewards score the decoded image of a CLEAN latent (noise level 0) against the prompt text; a noisy latent is
  an error that says to score its denoised estimate x0_hat = x_s - s * v instead (that costs a policy forward per
  latent, which is exactly what the DRM avoids):
  - `oracle`: the toy world's hidden oracle (drm_ray/toy/oracle.py), for the toy preset.
  - `clip`: a CLIP-family preference / alignment model loaded with transformers' `CLIPModel` + `AutoProcessor`
    from a local directory (PickScore is such a model: score = logit_scale * cos(image, text), its own reward;
    for an OpenAI CLIP checkpoint the same number is 100 x cosine, i.e. CLIPScore / 2.5 without the clamp at 0).
  - `callable`: `module:attribute` for anything else (ImageReward, HPSv3, an in-house judge). The attribute is a
    function `fn(images, prompts) -> N floats`, or a class built once with no arguments whose instances are such
    functions (so it can load its model once). `images` is a uint8 numpy array [N, H, W, 3], `prompts` a list of N
    strings; the result is anything `numpy.asarray` turns into N finite floats (higher is better).

Each kind but the oracle takes its model from its config field (reward.drm_path, reward.clip_path, reward.callable)
or from the spec itself, `kind@source` (`clip@/models/PickScore_v1`), so one run can use two models of one kind;
such a reward is named `kind-<last part of the source>` in metrics.

A `RewardSet` holds several named rewards with weights. Its `score_all` returns one column per reward ([N, R]);
how columns combine is the caller's choice (Step-GRPO / GRPO and Step-wise Sampling combine them at the advantage
level: `drm_ray.algorithms.advantages.combine_rewards`), and `score` is the weighted sum for callers that need one
number per latent.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from drm_ray.reward.specs import IMAGE_KINDS, SOURCE_FIELDS, RewardSpec

def _check_request(latents: torch.Tensor, noise_levels: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int):
    n = latents.shape[0]
    if latents.dim() != 4 or noise_levels.shape != (n,) or prompt_index.shape != (n,):
        raise ValueError(f"a reward request is latents [N, C, h, w], noise_levels [N], prompt_index [N]; got "
                         f"{tuple(latents.shape)}, {tuple(noise_levels.shape)}, {tuple(prompt_index.shape)}")
    if n and (int(prompt_index.min()) < 0 or int(prompt_index.max()) >= n_prompts):
        raise IndexError(f"prompt_index must lie in [0, {n_prompts}) (the prompt table's rows), got "
                         f"[{int(prompt_index.min())}, {int(prompt_index.max())}]")


class DRMReward:
    """R(x_s, s, c) of a DRM directory; each distinct prompt's embeddings are gathered once per call."""

    kind = "drm"

    def __init__(self, drm_path: str, prompts, device=None, dtype: torch.dtype | None = None, max_batch: int = 64):
        from drm_ray.models.sd3 import default_device
        from drm_ray.reward.model import DiffusionRewardModel

        self.prompts = prompts
        self.device = device or default_device()
        self.drm = DiffusionRewardModel.from_pretrained(drm_path, device=self.device, dtype=dtype)
        self.drm.requires_grad_(False)
        self.max_batch = max_batch

    @torch.no_grad()
    def score_embedded(self, latents, noise_levels, prompt_embeds, pooled, rows=None) -> torch.Tensor:
        """latents [N, ...], noise_levels [N], prompt_embeds [U, L, D], pooled [U, P]; latent i uses prompt row
        rows[i] (rows=None: row i)."""
        out = []
        for lo in range(0, latents.shape[0], self.max_batch):
            hi = lo + self.max_batch
            sel = slice(lo, hi) if rows is None else rows[lo:hi]
            r = self.drm(latents[lo:hi].to(self.device), noise_levels[lo:hi].to(self.device),
                         prompt_embeds[sel].to(self.device), pooled[sel].to(self.device))
            out.append(r.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, latents, noise_levels, prompt_index) -> torch.Tensor:
        prompt_index = torch.as_tensor(prompt_index, dtype=torch.long)
        _check_request(latents, noise_levels, prompt_index, len(self.prompts))
        distinct, rows = torch.unique(prompt_index, return_inverse=True)
        embeds, pooled, _, _ = self.prompts.rows(distinct, self.device, self.drm.dtype)  # [U, L, D], [U, P]
        return self.score_embedded(latents, noise_levels.float(), embeds, pooled, rows.to(self.device))


class ImageReward:
    """Decodes clean latents with the preset's VAE and scores the images against the prompt texts."""

    def __init__(self, prompts, vae, max_batch: int = 32):
        self.prompts, self.vae, self.max_batch = prompts, vae, max_batch

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        from drm_ray.diffusion.sampling import decode_latents

        with torch.no_grad():
            return torch.cat([decode_latents(self.vae, latents[lo:lo + self.max_batch].to(self.vae.device)).cpu()
                              for lo in range(0, latents.shape[0], self.max_batch)])  # [N, 3, H, W] in [0, 1]

    def score(self, latents, noise_levels, prompt_index) -> torch.Tensor:
        prompt_index = torch.as_tensor(prompt_index, dtype=torch.long)
        _check_request(latents, noise_levels, prompt_index, len(self.prompts))
        if latents.shape[0] == 0:
            return torch.zeros(0)
        noisy = noise_levels.abs() > 0
        if bool(noisy.any()):
            raise ValueError(f"the {self.kind} reward scores clean images, but {int(noisy.sum())} of "
                             f"{latents.shape[0]} latents have noise level > 0 (max {float(noise_levels.max()):.3f}): "
                             "score their denoised estimate x0_hat = x_s - s * v instead (RewardSet.score_all(..., "
                             "clean=x0_hat), as Step-GRPO and Step-wise Sampling do for image rewards)")
        texts = [self.prompts.prompts[i] for i in prompt_index.tolist()]
        scores = torch.as_tensor(np.asarray(self.score_images(self.images(latents), texts), dtype=np.float64))
        if scores.shape != (latents.shape[0],):
            raise ValueError(f"the {self.kind} reward returned shape {tuple(scores.shape)} for "
                             f"{latents.shape[0]} images (expected one score each)")
        return scores.float()

    def score_images(self, images: torch.Tensor, texts: list[str]):
        raise NotImplementedError


class OracleReward(ImageReward):
    """The toy world's hidden oracle grade in [0, 1]."""

    kind = "oracle"

    def score_images(self, images, texts):
        from drm_ray.toy.oracle import oracle_scores

        return oracle_scores(images, texts).score


class CLIPReward(ImageReward):
    """logit_scale * cos(image embedding, text embedding) of a CLIPModel directory (PickScore's reward)."""

    kind = "clip"

    def __init__(self, path: str, prompts, vae, device=None, max_batch: int = 32):
        from transformers import AutoProcessor, CLIPModel

        from drm_ray.models.sd3 import default_device

        super().__init__(prompts, vae, max_batch)
        self.device = device or default_device()
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"reward.clip_path={path}: not a CLIPModel directory with its processor "
                             f"(config.json, weights, preprocessor and tokenizer files): {err}") from err
        self.model.requires_grad_(False)

    @torch.no_grad()
    def score_images(self, images, texts):
        pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # as a saved PNG holds them
        inputs = self.processor(text=texts, images=list(pixels), return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        # logits_per_image[i, j] = logit_scale * cos(image i, text j): image i goes with text i
        return self.model(**inputs).logits_per_image.diagonal().float().cpu().numpy()


class CallableReward(ImageReward):
    """`module:attribute`, a function fn(images uint8 [N, H, W, 3], prompts) -> N floats (or a class of them)."""

    kind = "callable"

    def __init__(self, target: str, prompts, vae, max_batch: int = 32):
        super().__init__(prompts, vae, max_batch)
        self.fn = load_callable(target)
        self.target = target

    def score_images(self, images, texts):
        pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        out = np.asarray(self.fn(pixels, texts), dtype=np.float64).reshape(-1)
        if not np.isfinite(out).all():
            raise ValueError(f"reward.callable={self.target} returned non-finite scores: {out[~np.isfinite(out)][:4]}")
        return out


def load_callable(target: str):
    module, sep, attr = str(target).partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward.callable={target!r} must look like 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward.callable={target!r} cannot be loaded: {err}") from err
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"reward.callable={target!r} is not callable")
    return obj


class RewardSet:
    """Named rewards with weights over one prompt table: `score_all` -> [N, R], `score` -> the weighted sum [N]."""

    def __init__(self, specs: list[RewardSpec], prompts, *, preset: str, model_path: str | None = None,
                 resolution: int = 64, seed: int = 0, drm_path: str | None = None, clip_path: str | None = None,
                 callable_target: str | None = None, dtype: torch.dtype | None = None, max_batch: int = 64):
        if not specs:
            raise ValueError("a reward set needs at least one reward")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"each reward may appear once (a second model of one kind names its own: "
                             f"kind@source), got {names}")
        self.specs, self.prompts = list(specs), prompts
        vae = None
        if any(s.kind in IMAGE_KINDS for s in specs):
            from drm_ray.models.sd3 import load_vae

            vae = load_vae(preset, model_path, resolution, seed)
        defaults = {"drm": drm_path, "clip": clip_path, "callable": callable_target}
        self.models = []
        for s in specs:
            source = s.source or defaults.get(s.kind)
            if s.kind != "oracle" and not source:
                raise ValueError(f"the {s.kind} reward needs {SOURCE_FIELDS[s.kind]} or {s.kind}@source ("
                                 + {"drm": "a directory from jobs/train_drm.py",
                                    "clip": "a local CLIPModel directory, e.g. PickScore",
                                    "callable": "'package.module:function'"}[s.kind] + ")")
            if s.kind == "drm":
                self.models.append(DRMReward(source, prompts, dtype=dtype, max_batch=max_batch))
            elif s.kind == "oracle":
                if preset != "toy":
                    raise ValueError(f"the oracle reward grades toy-world images; model.preset is {preset!r}")
                self.models.append(OracleReward(prompts, vae))
            elif s.kind == "clip":
                self.models.append(CLIPReward(source, prompts, vae))
            else:
                self.models.append(CallableReward(source, prompts, vae))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.specs]

    def score_all(self, latents, noise_levels, prompt_index, clean=None) -> torch.Tensor:
        """[N, R]: one column per reward, in the order of the specs. `clean` [N, C, h, w] (optional): the denoised
        estimate x0_hat of each latent, which image rewards score (at noise level 0) in place of a noisy latent;
        the DRM always scores `latents` at `noise_levels`."""
        cols = []
        for m in self.models:
            if m.kind != "drm" and clean is not None:
                cols.append(m.score(clean, torch.zeros_like(noise_levels), prompt_index))
            else:
                cols.append(m.score(latents, noise_levels, prompt_index))
        return torch.stack(cols, dim=1)

    def score(self, latents, noise_levels, prompt_index, clean=None) -> torch.Tensor:
        """The weighted sum of `score_all` [N]."""
        return self.score_all(latents, noise_levels, prompt_index, clean) @ torch.tensor(self.weights)

    @property
    def needs_clean(self) -> bool:
        """True when some reward scores images: noisy latents need their x0_hat."""
        return any(s.kind in IMAGE_KINDS for s in self.specs)

    def drms(self) -> list[DRMReward]:
        return [m for m in self.models if m.kind == "drm"]
