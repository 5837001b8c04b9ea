"""A prompt set encoded once: SD3 text embeddings for every prompt plus the negative prompt, in half precision.

Sizes at paper scale (SD3.5-Medium): embeddings [333, 4096] + pooled [2048] per prompt = 2.7 MB in float16 (5.5 MB
in float32), so 25k RL prompts are ~68 GB. The table is therefore held ONCE PER NODE: its arrays are numpy float16,
which Ray's object store deserializes zero-copy (read-only views of the node's shared memory; torch tensors would be
copied into every process), and every rollout worker, scorer and learner rank maps the same bytes. `rows(index,
device)` gathers only the requested rows and converts them to float32 (or a given dtype) on the device, so requests
carry prompt indices, never embeddings.

On GPU presets `encode_prompt_table` runs in a Ray task (the text encoders never live in the driver) and its result
stays in the object store: the driver passes the ObjectRef on and never fetches the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from drm_ray.data.table_holder import PromptTableHolder

STORE_DTYPE = np.float16


def _half(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=STORE_DTYPE)


@dataclass
class PromptTable:
    prompts: list[str]
    embeds: np.ndarray       # [P, L, D] float16
    pooled: np.ndarray       # [P, Dp] float16
    neg_embeds: np.ndarray   # [L, D] the negative (unconditional) prompt
    neg_pooled: np.ndarray   # [Dp]

    def __post_init__(self):
        # runs when the table is built, never when Ray deserializes it (pickle skips __init__), so the zero-copy
        # views of the object store are kept as they are
        for name in ("embeds", "pooled", "neg_embeds", "neg_pooled"):
            setattr(self, name, _half(getattr(self, name)))

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, index: torch.Tensor | list[int], device=None,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """(embeds [B, L, D], pooled [B, Dp], neg_embeds [B, L, D], neg_pooled [B, Dp]) for prompt indices: the
        gathered float16 rows travel to `device` and are converted there to `dtype`."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu().numpy()
        b = len(idx)
        # fancy indexing copies just these rows out of the shared (read-only) table
        half = (self.embeds[idx], self.pooled[idx], self.neg_embeds[None].copy(), self.neg_pooled[None].copy())
        moved = (torch.from_numpy(a) if device is None else torch.from_numpy(a).to(device) for a in half)
        e, p, ne, npool = (t.to(dtype) for t in moved)  # half the bytes over PCIe; converted on the device
        return e, p, ne.expand(b, -1, -1), npool.expand(b, -1)


def encode_prompt_table(prompts: list[str], negative_prompt: str, preset: str, model_kwargs: dict,
                        batch_size: int = 32) -> PromptTable:
    """Encode `prompts` with the preset's text encoders (on the local device); float16 rows, built batch by batch."""
    from drm_ray.models.sd3 import build_components, encode_prompts

    comps = build_components(preset, text=True, vae=False, **model_kwargs)
    max_len = model_kwargs["max_sequence_length"]
    neg, neg_pooled = encode_prompts(comps, [negative_prompt], max_len)
    # filled in place: one table in memory while encoding (68 GB for 25k prompts at sd35m), never a second for a concat
    embeds = np.empty((len(prompts), *neg.shape[1:]), dtype=STORE_DTYPE)  # [P, L, D]
    pooled = np.empty((len(prompts), *neg_pooled.shape[1:]), dtype=STORE_DTYPE)  # [P, Dp]
    for lo in range(0, len(prompts), batch_size):
        e, p = encode_prompts(comps, prompts[lo:lo + batch_size], max_len)
        embeds[lo:lo + len(e)] = _half(e)
        pooled[lo:lo + len(p)] = _half(p)
    return PromptTable(list(prompts), embeds, pooled, neg[0], neg_pooled[0])


_HOLDERS: dict[str, object] = {}  # name -> holder handle, kept by the process that shared the table


def share_table(table_ref) -> str:
    """Hold `table_ref` in a named `PromptTableHolder` on this node (no CPU) and return the name actors take."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"drm_ray_prompts_{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    _HOLDERS[name] = ray.remote(PromptTableHolder).options(name=name, num_cpus=0, scheduling_strategy=here) \
        .remote([table_ref])
    return name


def release_table(name: str) -> None:
    """End the holder `share_table` made (the job's actors have their tables)."""
    import ray

    holder = _HOLDERS.pop(name, None)
    if holder is not None:
        ray.kill(holder)


def resolve_table(prompts):
    """The PromptTable an actor was given: the table itself (in-process use, or a top-level reference that Ray
    resolved), or the name of the `PromptTableHolder` the RL job shares it through (`share_table`)."""
    if isinstance(prompts, str):
        import ray

        box = ray.get(ray.get_actor(prompts).get.remote())
        return ray.get(box[0])
    return prompts


def prompt_table_ref(prompts: list[str], negative_prompt: str, preset: str, model_kwargs: dict, on_gpu: bool):
    """The table of `prompts` in the object store, as an ObjectRef. Pre-trained presets encode in a Ray task (on a
    GPU when `on_gpu`) whose result the caller never fetches, so the text encoders never load on the driver; the
    CPU presets encode here (the driver already has everything imported)."""
    import ray

    from drm_ray.runtime import CPU_PRESETS

    args = (prompts, negative_prompt, preset, model_kwargs)
    if preset in CPU_PRESETS:
        return ray.put(encode_prompt_table(*args))
    return ray.remote(encode_prompt_table).options(num_gpus=1 if on_gpu else 0, num_cpus=1).remote(*args)
