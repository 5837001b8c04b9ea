"""Shared fixtures: one torch thread per process, no hub access, DeepSpeed on CPU, one local Ray per session."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "drm_ray_torch_ext"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """Tiny SD3 components (seed 0, 64 px): shared, so tests must not modify their weights."""
    from drm_ray.models.sd3 import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (start-up costs 5-7 s)."""
    import ray

    if not ray.is_initialized():
        # address="local": never attach to a `ray start` cluster that another process left on this machine.
        # PYTHONPATH: actors import the tests' reward plug-ins (reward.callable=reward_plugins:...) as a user's would
        path = os.pathsep.join(p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                                           "PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group():
    """torch.distributed with world size 1 in the test process, as DeepSpeed expects, for the whole session: DeepSpeed
    keeps handles on the groups of its first engine, so a group destroyed and made again breaks later engines."""
    import socket

    import torch.distributed as dist

    mp = pytest.MonkeyPatch()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        mp.setenv(key, value)  # what torchrun / Ray Train set for DeepSpeed
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    mp.undo()


@pytest.fixture(scope="session")
def tiny_drm_dir(tmp_path_factory):
    """An untrained tiny DRM directory: an arbitrary but fixed scoring function, enough to exercise the machinery."""
    from drm_ray.reward.model import build_drm
    from drm_ray.models.sd3 import build_tiny

    path = tmp_path_factory.mktemp("drm") / "drm"
    build_drm(build_tiny(seed=0, text=False, vae=False).transformer, latent_size=8, seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def one_iteration(ray_session, tmp_path_factory, tiny_drm_dir):
    """One Step-GRPO iteration of the default tiny RL config (one rollout worker, one learner worker), run once for
    the tests that compare with it or read its metrics: (the driver after `run()`, its summary). A driver costs
    ~30 s of actor and Ray Train start-up on 2 cores."""
    from drm_ray.driver import StepGRPODriver

    driver = StepGRPODriver(rl_config(tmp_path_factory.mktemp("one_iteration"), tiny_drm_dir))
    return driver, driver.run()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random-init CLIPModel with its processor (byte-level tokenizer built in code), saved as a user's
    PickScore directory would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from drm_ray.models.components import seeded
    from drm_ray.models.tiny_text import tiny_clip_tokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = tmp_path_factory.mktemp("clip") / "pickscore"
    seeded(0, lambda: CLIPModel(config)).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_clip_tokenizer())
    processor.save_pretrained(path)
    return path


def rl_config(out, drm_dir, *overrides):
    """The tiny Step-GRPO config the RL tests share: one iteration of 4 prompts unless overridden."""
    from drm_ray.config import load_config

    return load_config("tiny", [f"run.output_dir={out}", f"reward.drm_path={drm_dir}", "grpo.iterations=1",
                                "grpo.prompts_per_iter=4", "grpo.eval_every=100", *overrides], job="step_grpo")
