"""Configuration: one frozen dataclass per section, YAML presets, dotted command-line overrides, one `validate()`.

    cfg = load_config("tiny", overrides=["sampling.k=4", "grpo.algo=grpo"])

A preset is a YAML file (`drm_ray/configs/<name>.yaml`, or any path) holding a subset of the sections below; what it
leaves out keeps the dataclass default. Overrides are `section.field=value` with the value parsed as YAML
(`sampling.k=4`, `grpo.branch_steps=[0,1,2]`, `reward.drm_path=null`). Unknown sections or fields, values of the
wrong type and values outside their rule all raise `ConfigError` naming the field. Only the driver holds the whole
config; builders and workers take plain arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "configs"

SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class ConfigError(ValueError):
    """A configuration value that breaks a rule; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"                 # tiny: random-init SD3 architecture; toy: the toy world's pre-trained model;
                                         # sd35m: pre-trained weights from `path`
    path: str | None = None              # sd35m: local diffusers directory or hub id; toy: jobs/pretrain_toy.py output
    dtype: str = "float32"               # float32 | bfloat16 | float16 (the flow math is float32 regardless)
    seed: int = 0                        # tiny: init seed, so every process builds the same weights
    num_layers: int = 4                  # tiny architecture; the DRM drops 3 blocks, so at least 4
    num_attention_heads: int = 2         # tiny / toy architecture: attention heads per block
    attention_head_dim: int = 16         # tiny / toy architecture: width per head (block width = heads x dim)
    max_sequence_length: int = 32        # T5 tokens per prompt (SD3.5 uses 256)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 4                        # LoRA rank of every adapted projection
    alpha: float = 8.0                   # LoRA scale alpha (the update is alpha / rank x B A)
    target_modules: tuple[str, ...] = SD3_LORA_TARGETS  # projections that get an adapter (SD3 attention)


@dataclass(frozen=True)
class SamplingConfig:
    resolution: int = 64                 # pixels; latents are resolution / 8 (toy: / 4)
    num_steps: int = 4                   # denoising steps for rollouts and step-wise sampling
    eval_num_steps: int = 4              # ODE steps for evaluation panels
    guidance_scale: float = 4.5          # CFG weight w; <= 1 disables CFG
    noise_level: float = 0.7             # SDE noise level a; 0 makes every step a plain Euler (ODE) step
    shift: float = 3.0                   # FlowMatchEulerDiscreteScheduler shift
    k: int = 4                           # children per branching step (Step-GRPO) / candidates (Step-wise Sampling)
    negative_prompt: str = ""            # CFG's unconditional prompt


@dataclass(frozen=True)
class GRPOConfig:
    algo: str = "step_grpo"              # step_grpo | grpo
    branch_steps: tuple[int, ...] | None = None   # None: every step but the last
    continuation: str = "random"         # random | best | mean: which state a trajectory continues from
    shared_initial_noise: bool = False   # GRPO: a group's k trajectories start from one x_1 (DanceGRPO's
                                         # init_same_noise), so only their SDE noise tells them apart. Step-GRPO's
                                         # children share their parent state already
    prompts_per_iter: int = 4            # B prompt groups per iteration
    updates_per_iter: int = 1            # minibatches per iteration (contiguous runs of groups), one optimizer step
                                         # each (Flow-GRPO): the ratio is 1 on the first, the clip range acts later
    schedule: str = "pipelined"          # pipelined: score each rollout chunk when done, train each micro-batch when
                                         # its groups are scored; serial: rollout, then score, then learn. Same LoRA
    iterations: int = 20                 # policy updates (rollout -> score -> learn) of the run
    clip_eps: float = 1e-4               # PPO clip range of the ratio (acts from the second minibatch on)
    beta: float = 0.004                  # KL-to-reference weight
    adv_clip: float = 5.0                # advantages are clipped to [-adv_clip, adv_clip]
    adv_norm: str = "std"                # std: (r - group mean) / group std | mean: r - group mean (Dr. GRPO; a
                                         # group counts by its reward spread, so scales of several rewards count)
    eval_every: int = 5                  # image panel every N iterations
    eval_panel_size: int = 8             # panel images: prompts in order (cycling), one fixed seed each
    checkpoint_every: int = 5            # job checkpoint (LoRA, learner, sampler state) every N iterations


@dataclass(frozen=True)
class RewardConfig:
    drm_path: str | None = None          # the DRM the RL job and Step-wise Sampling score with (jobs/train_drm.py)
    rewards: tuple[str, ...] = ("drm",)  # what RL optimizes: "kind" or "kind=weight"; kinds drm | oracle (toy) |
                                         # clip | callable. Several combine at the advantage level (each reward
                                         # normalized in its group, then weighted)
    judges: tuple[str, ...] = ()         # kinds that score the evaluation panel and are never optimized
    clip_path: str | None = None         # clip kind: a local CLIPModel directory with its processor (PickScore)
    callable: str | None = None          # callable kind: "package.module:function" (see drm_ray/reward/rewards.py)


@dataclass(frozen=True)
class DRMConfig:
    """Training the DRM (jobs/train_drm.py): the model, the Bradley-Terry loop and its own Ray Train workers."""
    n_drop: int = 3                      # transformer blocks removed from the end
    head: str = "mlp"                    # mlp (fixed resolution) | mean (any resolution)
    head_dim: int = 4                    # per-token features of the mlp head
    init: str = "pretrained"             # pretrained | random (the paper's ablation)
    train_blocks: int | None = None      # None: every weight learns; N: only the last N kept blocks and the head
                                         # (the embedders and earlier blocks keep their initial weights, no
                                         # optimizer state for them)
    lr: float = 1e-4                     # AdamW learning rate of DRM training
    batch_size: int = 16                 # pairs per optimizer step (global, over every rank and micro-step)
    micro_batch: int | None = None       # pairs per rank per forward/backward; None: batch_size / num_workers.
                                         # batch_size / (micro_batch * num_workers) micro-steps are accumulated
    gradient_checkpointing: bool = False  # recompute each kept block in the backward pass (activation memory)
    train_steps: int = 300               # optimizer steps of DRM training
    zero_noise_prob: float = 0.1         # chance that a pair is scored clean (s = 0)
    pair_noise: str = "independent"      # independent: winner and loser get their own noise | shared: one noise
                                         # for both (as Diffusion-DPO noises its pairs), so their difference is
                                         # the images' alone. Evaluation always noises them independently
    max_grad_norm: float = 1.0           # gradient clipping of DRM training
    log_every: int = 10                  # steps between metric lines
    checkpoint_every: int = 100          # steps between Ray Train checkpoints
    val_every: int = 0                   # steps between held-out validations (0: never); needs data.heldout_data
    val_pairs: int = 512                 # held-out pairs scored per validation (the first ones of the cache)
    val_timesteps: tuple[int, ...] = (0, 250, 500, 750)  # noise levels t of the validation (s = t / 1000)
    num_workers: int = 1                 # Ray Train workers (data parallel)
    use_gpu: bool = False                # one GPU per DRM-training worker
    num_cpus: float = 0.5                # per worker
    resources: tuple[str, ...] = ()      # custom Ray resources per worker, "name=amount"


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = 1                 # rollout worker actors (one policy copy each)
    num_scorers: int = 1                 # reward scorer actors (one reward-model copy each)
    num_gpus: float = 0.0                # per actor; 1 on GPU presets
    num_cpus: float = 0.25               # per actor
    groups_per_call: int = 2             # prompt groups per rollout call: fixed, so results do not depend on the
                                         # number of workers (same batches, same floating-point sums)
    timeout_s: float = 600.0             # every wait on a remote call gives up after this
    resources: tuple[str, ...] = ()      # custom Ray resources per scorer / rollout worker, "name=amount"
    autoscale_wait_s: float = 0.0        # > 0: an autoscaling cluster; wait this long for missing resources
    max_restarts: int = 3                # Ray restarts a dead rollout worker / scorer this often


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = 1                 # Ray Train learner workers (DeepSpeed data parallel)
    use_gpu: bool = False                # one GPU per learner worker
    num_cpus: float = 0.5                # per learner worker (Ray Train resources_per_worker)
    publish_dtype: str = "float32"       # LoRA state sent to rollout workers: bfloat16 on GPU presets
    lr: float = 1e-4                     # AdamW learning rate of the LoRA
    weight_decay: float = 0.0            # AdamW weight decay of the LoRA
    max_grad_norm: float = 1.0           # gradient clipping of each policy update
    micro_batch_states: int = 8          # recorded states per backward call
    resources: tuple[str, ...] = ()      # custom Ray resources per learner worker, "name=amount"
    max_failures: int = 3                # Ray Train restarts of the learner's worker group
    state_every: int = 1                 # save LoRA + optimizer state every N updates (fault tolerance); the driver
                                         # keeps the batches since the last save and replays them after a restart


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 2                  # DeepSpeed ZeRO stage over the trainable (LoRA) parameters
    bf16: bool = False                   # DeepSpeed bf16 mixed precision (GPU presets)


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None      # None: sqlite `mlflow.db` in the output directory
    experiment: str = "drm-ray"          # MLflow experiment name
    run_name: str | None = None          # MLflow run name (None: the algorithm / job name)


@dataclass(frozen=True)
class DataConfig:
    prompts: str | None = None           # a .txt (one per line) or .parquet (`prompt` column); None: built-in set
    eval_prompts: str | None = None      # held-out prompts for the RL evaluation panel and its judges (same
                                         # formats); None: the panel uses training prompts
    preference_data: str | None = None   # Parquet of preference pairs; None: the built-in synthetic set (tiny)
    cache_dir: str | None = None         # latent / text-embedding cache
    heldout_data: str | None = None      # held-out preference Parquet or cache: DRM validation during training
    encoder_workers: int = 1             # preprocessing: encoder actors (VAE + text encoders), one model copy each
    encoder_gpus: float = 0.0            # preprocessing: GPUs per encoder actor (1 on GPU presets)
    encoder_batch_size: int = 16         # preprocessing: pairs per encoder call
    shard_rows: int = 256                # cache: pairs per shard
    latent_dtype: str = "float32"        # cache: dtype of stored latents (float32 | bfloat16 | float16)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "outputs/run"      # where the job writes MLflow, checkpoints and results (resume reads it back)
    seed: int = 42                       # seed of prompts, noise and initialisation


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    drm: DRMConfig = field(default_factory=DRMConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            return list(x) if isinstance(x, tuple) else x
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`section.field -> value`, for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def drm_accumulation(self) -> tuple[int, int]:
        """(pairs per rank per micro-step, micro-steps per optimizer step) of DRM training."""
        d = self.drm
        workers = max(1, d.num_workers)  # validate() reports num_workers < 1; this must not divide by zero first
        micro = d.micro_batch if d.micro_batch is not None else max(1, d.batch_size // workers)
        return micro, max(1, d.batch_size // (max(1, micro) * workers))

    def branch_steps(self) -> tuple[int, ...]:
        """Steps at which Step-GRPO branches; the last step is never trained."""
        if self.grpo.branch_steps is None:
            return tuple(range(self.sampling.num_steps - 1))
        return tuple(self.grpo.branch_steps)

    def lora_spec(self) -> dict:
        """The LoRA adapter as rollout workers and learner ranks build it (plain values, picklable)."""
        return {"rank": self.lora.rank, "alpha": self.lora.alpha, "target_modules": list(self.lora.target_modules)}

    def rollout_sampling(self, k: int | None = None) -> dict:
        """What a rollout worker samples with: steps, CFG, SDE noise, k children, branching steps, continuation."""
        s = self.sampling
        return {"num_steps": s.num_steps, "guidance_scale": s.guidance_scale, "noise_level": s.noise_level,
                "k": k or s.k, "branch_steps": list(self.branch_steps()), "continuation": self.grpo.continuation,
                "shared_initial_noise": self.grpo.shared_initial_noise}

    def validate(self, job: str | None = None) -> "Config":
        """Check every rule at once; `job="step_grpo"` adds the rules of policy-gradient training."""
        from drm_ray.config_rules import rule_errors

        errors = rule_errors(self, rl=job == "step_grpo")
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
        return self


# ---------------------------------------------------------------------------------------------- loading


def load_config(preset: str | Path = "tiny", overrides: list[str] | tuple[str, ...] = (),
                job: str | None = None) -> Config:
    """Preset (name in drm_ray/configs or a YAML path) + dotted overrides, validated for `job`."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {str(preset)!r} not found (no file {path}); known presets: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        section, name, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        raw[section][name] = value
    return from_dict(raw).validate(job)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, type-checking every value (no rule checks: call validate())."""
    sections = {f.name: f for f in fields(Config)}
    kwargs = {}
    for sname, values in raw.items():
        if sname not in sections:
            raise ConfigError(f"unknown config section {sname!r}; known: {sorted(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {sname!r} must be a mapping, got {values!r}")
        cls = sections[sname].default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config field {sname}.{key}; known: {sorted(known)}")
        kwargs[sname] = cls(**{k: _coerce(v, hints[k], f"{sname}.{k}") for k, v in values.items()})
    return Config(**kwargs)


def _parse_override(item: str) -> tuple[str, str, Any]:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.field=value (for example sampling.k=4)")
    return parts[0], parts[1], yaml.safe_load(text) if text.strip() else ""


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r}: must be a list")
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} = {value!r}: must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r}: must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r}: must be a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")  # a bug in this file, not user input
