"""The RL job's data plane: a zero-copy half-precision prompt table per node; latents that never pass the driver.

Through real local Ray (and, for the driver test, real Ray Train + DeepSpeed) on the tiny preset.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import rl_config
from drm_ray.algorithms.rl_batch import chunk_sources, gather_states
from drm_ray.data.prompt_table import encode_prompt_table
from drm_ray.workers.rollout import GroupLatents

KWARGS = dict(path=None, dtype="float32", seed=0, num_layers=4, num_attention_heads=2, attention_head_dim=16,
              resolution=64, max_sequence_length=32, shift=3.0)


def test_prompt_table_is_half_precision_and_rows_are_float32():
    table = encode_prompt_table(["a red circle", "a blue square", "a green triangle"], "", "tiny", KWARGS)
    assert table.embeds.dtype == np.float16 and table.pooled.dtype == np.float16 and len(table) == 3
    assert table.embeds.shape[:2] == (3, 32 + 77)  # T5 tokens + CLIP tokens of the tiny text stack
    e, p, ne, npool = table.rows([2, 0, 2])
    assert e.dtype == torch.float32 and e.shape[0] == 3 and ne.shape == e.shape and npool.shape == p.shape
    assert torch.equal(e[0], torch.from_numpy(table.embeds[2].astype(np.float32)))
    assert torch.equal(e[1], torch.from_numpy(table.embeds[0].astype(np.float32)))


@pytest.mark.parametrize("module, heavy", [
    ("drm_ray.data.table_holder", ["numpy", "torch"]),  # a process that only keeps a reference
    ("drm_ray.workers.coordinator", ["diffusers", "peft", "transformers", "deepspeed"]),  # tensors, no model stack
])
def test_small_actors_import_only_what_they_use(module, heavy):
    # an actor process imports the module that defines its class: every library here is seconds of job start-up
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", (module, out.stdout)


@pytest.mark.slow
def test_actors_hold_the_prompt_table_zero_copy(ray_session):
    # inside an actor the embeddings are read-only views of the object store's shared memory, not private copies
    from drm_ray.workers.rollout import RolloutWorker

    ray = ray_session
    table = encode_prompt_table(["a red circle", "a blue square"], "", "tiny", KWARGS)
    ref = ray.put(table)
    sampling = dict(num_steps=3, guidance_scale=4.5, noise_level=0.7, k=2, branch_steps=[0], continuation="random")
    lora = dict(rank=4, alpha=8.0, target_modules=["attn.to_q"])
    worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote("tiny", KWARGS, lora, ref, sampling)

    def inspect(self):
        a = self.prompts.embeds
        return str(a.dtype), a.flags.writeable, a.flags.owndata, a.base is not None, a.nbytes

    dtype, writeable, owndata, has_base, nbytes = ray.get(worker.__ray_call__.remote(inspect), timeout=120)
    assert dtype == "float16" and not writeable and not owndata and has_base
    assert nbytes == table.embeds.nbytes
    ray.kill(worker)


def test_gather_states_fetches_only_the_chunks_a_cell_needs():
    def chunk(start, sizes):  # groups whose states hold their global index
        out, i = [], start
        for n in sizes:
            states = torch.arange(i, i + n, dtype=torch.float32).view(n, 1)
            out.append(GroupLatents(states, states.view(n, 1, 1).repeat(1, 2, 1), torch.zeros(1, 1)))
            i += n
        return out

    chunks = [(0, 6, chunk(0, [3, 3])), (6, 6, chunk(6, [3, 3])), (12, 3, chunk(12, [3]))]
    index = torch.tensor([7, 8, 10, 13])  # a cell touching chunks 1 and 2 only
    assert [c[0] for c in chunk_sources(index, chunks)] == [6, 12]
    states, children = gather_states(index, [chunks[2], chunks[1]])  # in any order
    assert states.view(-1).tolist() == [7.0, 8.0, 10.0, 13.0] and children.shape == (4, 2, 1)
    empty, _ = gather_states(torch.zeros(0, dtype=torch.long), [chunks[0]])
    assert empty.shape == (0, 1) and chunk_sources(torch.zeros(0, dtype=torch.long), chunks) == []
    with pytest.raises(ValueError, match="none of the given chunks"):
        gather_states(index, [chunks[1]])


@pytest.mark.slow
def test_driver_bytes_per_iteration_do_not_grow_with_the_latent_size(ray_session, tmp_path, one_iteration):
    from drm_ray.driver import StepGRPODriver
    from drm_ray.models.sd3 import build_tiny
    from drm_ray.reward.model import build_drm

    driver, small = one_iteration  # 64 px
    assert driver.cfg.sampling.resolution == 64
    drm_dir = tmp_path / "drm128"
    transformer = build_tiny(seed=0, text=False, vae=False).transformer
    build_drm(transformer, latent_size=128 // 8, seed=3).save_pretrained(drm_dir)
    driver = StepGRPODriver(rl_config(tmp_path / "run128", drm_dir, "sampling.resolution=128"))
    large = driver.step()
    driver.finish()
    # the latents (states, children, finals of 4 groups) grow 4x with twice the resolution ...
    assert large["rollout/payload_bytes"] == 4 * small["rollout/payload_bytes"]
    # ... and never reach the driver: it receives records, scores and stats only, the same at both sizes
    assert small["driver/bytes_in"] == large["driver/bytes_in"]
    assert 0 < small["driver/bytes_in"] < small["rollout/payload_bytes"] / 20
