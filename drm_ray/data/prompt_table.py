"""A prompt set encoded once: SD3 text embeddings for every prompt plus the negative prompt.

The driver builds it once (`encode_prompt_table`, in a Ray task so the text encoders never live in the driver on a
GPU cluster) and `ray.put`s it once; rollout workers, scorers and the learner read rows by prompt index, so requests
carry indices, never embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptTable:
    prompts: list[str]
    embeds: torch.Tensor       # [P, L, D]
    pooled: torch.Tensor       # [P, Dp]
    neg_embeds: torch.Tensor   # [L, D] the negative (unconditional) prompt
    neg_pooled: torch.Tensor   # [Dp]

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, index: torch.Tensor | list[int], device=None) -> tuple[torch.Tensor, ...]:
        """(embeds [B, L, D], pooled [B, Dp], neg_embeds [B, L, D], neg_pooled [B, Dp]) for prompt indices."""
        idx = torch.as_tensor(index, dtype=torch.long)
        b = len(idx)
        out = (self.embeds[idx], self.pooled[idx], self.neg_embeds.expand(b, -1, -1), self.neg_pooled.expand(b, -1))
        return tuple(t.to(device) for t in out) if device is not None else out


def encode_prompt_table(prompts: list[str], negative_prompt: str, preset: str, model_kwargs: dict,
                        batch_size: int = 32) -> PromptTable:
    """Encode `prompts` with the preset's text encoders (on the local device)."""
    from drm_ray.models.sd3 import build_components, encode_prompts

    comps = build_components(preset, text=True, vae=False, **model_kwargs)
    max_len = model_kwargs["max_sequence_length"]
    embeds, pooled = [], []
    for lo in range(0, len(prompts), batch_size):
        e, p = encode_prompts(comps, prompts[lo:lo + batch_size], max_len)
        embeds.append(e.float().cpu())
        pooled.append(p.float().cpu())
    neg, neg_pooled = encode_prompts(comps, [negative_prompt], max_len)
    return PromptTable(list(prompts), torch.cat(embeds), torch.cat(pooled), neg[0].float().cpu(),
                       neg_pooled[0].float().cpu())
