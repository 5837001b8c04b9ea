import pytest

from drm_ray.config import ConfigError, from_dict, load_config


def test_presets_load():
    tiny = load_config("tiny")
    assert tiny.model.preset == "tiny" and tiny.sampling.resolution == 64
    sd = load_config("sd35m")
    assert (sd.sampling.k, sd.lora.rank, sd.lora.alpha, sd.sampling.num_steps, sd.sampling.eval_num_steps) == (
        6, 32, 64.0, 10, 40)
    assert sd.drm.lr == 1e-5 and sd.deepspeed.bf16 and "attn.to_add_out" in sd.lora.target_modules


def test_overrides_apply_and_keep_types():
    cfg = load_config("tiny", ["sampling.k=6", "grpo.branch_steps=[0, 2]", "learner.lr=3e-4",
                               "reward.drm_path=/tmp/drm", "grpo.algo=grpo", "learner.use_gpu=false"])
    assert cfg.sampling.k == 6
    assert cfg.grpo.branch_steps == (0, 2) and cfg.branch_steps() == (0, 2)
    assert cfg.learner.lr == pytest.approx(3e-4) and isinstance(cfg.learner.lr, float)
    assert cfg.reward.drm_path == "/tmp/drm" and cfg.grpo.algo == "grpo"
    assert load_config("tiny").branch_steps() == (0, 1, 2)  # every step but the last of 4


def test_yaml_round_trip(tmp_path):
    cfg = load_config("tiny", ["sampling.k=3"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, field", [
    ("sampling.k=0", "sampling.k"),
    ("sampling.num_steps=1", "sampling.num_steps"),
    ("sampling.resolution=50", "sampling.resolution"),
    ("sampling.noise_level=-0.1", "sampling.noise_level"),
    ("grpo.algo=ppo", "grpo.algo"),
    ("grpo.branch_steps=[3]", "grpo.branch_steps"),
    ("grpo.branch_steps=[]", "grpo.branch_steps"),
    ("grpo.continuation=worst", "grpo.continuation"),
    ("grpo.clip_eps=0", "grpo.clip_eps"),
    ("grpo.adv_norm=max", "grpo.adv_norm"),
    ("learner.lr=0", "learner.lr"),
    ("drm.lr=-1e-5", "drm.lr"),
    ("drm.head=attention", "drm.head"),
    ("drm.pair_noise=same", "drm.pair_noise"),
    ("grpo.shared_initial_noise=maybe", "grpo.shared_initial_noise"),
    ("drm.train_blocks=2", "drm.train_blocks"),  # tiny keeps 4 - 3 = 1 block
    ("drm.train_blocks=-1", "drm.train_blocks"),
    ("model.preset=sdxl", "model.preset"),
    ("model.dtype=int8", "model.dtype"),
    ("model.num_layers=3", "model.num_layers"),
    ("rollout.num_workers=0", "rollout.num_workers"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
    ("sampling.k=four", "sampling.k"),            # wrong type
    ("learner.use_gpu=1", "learner.use_gpu"),     # wrong type
    ("sampling.kk=4", "sampling.kk"),             # unknown field
    ("samplin.k=4", "samplin"),                   # unknown section
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        load_config("tiny", [override])


def test_reward_and_judge_specs_are_checked():
    ok = ["reward.rewards=[drm, clip@/models/PickScore_v1=0.5, clip@/models/CLIP-ViT-L-14]",
          "reward.judges=[callable@my.rewards:hps, callable@my.rewards:image_reward]"]
    assert load_config("tiny", ok).reward.judges == ("callable@my.rewards:hps", "callable@my.rewards:image_reward")
    for overrides, message in [
        (["reward.rewards=[drm, drm=2]"], r"reward\.rewards .*names each reward at most once"),
        (["reward.judges=[clip@/a/m, clip@/b/m]"], r"reward\.judges .*at most once"),  # both are named clip-m
        (["reward.rewards=[oracle]"], "only with model.preset=toy"),
        (["reward.judges=[clip]"], r"reward\.clip_path .*required when reward\.judges has clip without '@source'"),
        (["reward.rewards=[callable]"], r"reward\.callable .*required when reward\.rewards has callable"),
        (["reward.rewards=[]"], r"reward\.rewards .*at least one"),
        (["reward.rewards=[pickscore]"], "unknown reward kind 'pickscore'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", overrides)
    assert load_config("toy", ["reward.rewards=[oracle]", "reward.judges=[clip]", "reward.clip_path=/m"])


def test_rl_rules_only_for_rl_jobs():
    assert load_config("tiny", ["sampling.k=1"]).sampling.k == 1  # plain sampling is fine with k = 1
    with pytest.raises(ConfigError, match=r"sampling\.k = 1"):
        load_config("tiny", ["sampling.k=1"], job="step_grpo")


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["learner.lr=-1", "sampling.k=1", "grpo.branch_steps=[7]"], job="step_grpo")
    msg = str(info.value)
    assert "learner.lr" in msg and "sampling.k" in msg and "grpo.branch_steps" in msg


def test_sd35m_needs_a_path_and_bad_preset_names():
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_config("sd35m", ["model.path=null"])
    with pytest.raises(ConfigError, match="known presets"):
        load_config("nope")
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("tiny", ["k=4"])
    assert from_dict({}).validate().model.preset == "tiny"
