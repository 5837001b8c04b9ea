"""The `toy` preset's SD3 components: a pre-trained SD3-architecture transformer, the PCA patch codec, and a word-level
text stack built in code.

    comps = build_toy("outputs/toy/pretrained")        # what jobs/pretrain_toy.py wrote
    transformer = toy_transformer(num_layers=6, ...)   # random init, the starting point of pre-training

The text encoders are the tiny preset's random-init CLIP x2 + T5 (seeded, so every process builds the same), with
tokenizers whose vocabularies hold the toy captions' words as single tokens (a BPE merge chain per word for CLIP,
a whole-word unigram piece for T5): the transformer then reads words, not characters, which it learns in minutes.
The CLIP context is 16 tokens instead of SD3's 77 (captions have at most 7 words), so 32 text tokens in all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTokenizer, T5Tokenizer

from drm_ray.models.components import SD3Components, empty_parts, seeded
from drm_ray.models.tiny_text import byte_clip_vocab, tiny_text_encoders
from drm_ray.toy.codec import PatchPCACodec
from drm_ray.toy.world import vocabulary

LATENT_CHANNELS = 16
VAE_SCALE = 4           # pixels per latent cell (the codec's patch size)
CLIP_LENGTH = 16


class ToyCheckpointError(FileNotFoundError):
    """model.path does not hold a pre-trained toy checkpoint."""


def toy_clip_tokenizer() -> CLIPTokenizer:
    vocab = byte_clip_vocab()
    merges: list[tuple[str, str]] = []
    for word in vocabulary():
        # Add merges at the lowest priority until BPE (with every merge so far) yields the whole word; earlier words
        # keep their tokenization because their merges outrank the new ones.
        while len(parts := _bpe(word, merges)) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LENGTH)


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the best-ranked adjacent pair (all its occurrences)."""
    rank = {m: i for i, m in enumerate(merges)}
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: rank.get(pair, len(rank)))
        if best not in rank:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def toy_t5_tokenizer(max_length: int) -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(chr(c), -1.0) for c in range(33, 127)] + [("\u2581", -2.0)]
    pieces += [("\u2581" + w, 0.0) for w in vocabulary()]  # a whole word always beats its characters
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def toy_text_stack(seed: int, max_sequence_length: int) -> dict:
    """The three text encoders (the tiny preset's, sized to the toy vocabularies) and their tokenizers."""
    clip, t5 = toy_clip_tokenizer(), toy_t5_tokenizer(max_sequence_length)
    encoders = tiny_text_encoders(seed, clip_vocab=len(clip), t5_vocab=len(t5), clip_length=CLIP_LENGTH)
    return dict(**encoders, tokenizer=clip, tokenizer_2=toy_clip_tokenizer(), tokenizer_3=t5)


def toy_transformer(seed: int = 0, num_layers: int = 6, num_attention_heads: int = 4, attention_head_dim: int = 16,
                    resolution: int = 32) -> SD3Transformer2DModel:
    """A random-init SD3 transformer of the toy size (text dims of the tiny text stack)."""
    latent = resolution // VAE_SCALE
    return seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=num_layers, attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=64, caption_projection_dim=num_attention_heads * attention_head_dim,
        # pos_embed_max_size = the 4x4 token grid, so neighbouring tokens sit 1 unit apart in the sin-cos embedding.
        # With a 16-wide grid (0.25 apart) the same 2500-step pre-training gave fragmented shapes scattered over the
        # image: 2% of samples correct instead of 56%.
        pooled_projection_dim=64, pos_embed_max_size=latent // 2,
    ))


def check_checkpoint(path: str | Path | None) -> Path:
    hint = "pre-train one with `python jobs/pretrain_toy.py` (about 10 minutes on CPU), or set model.path"
    if not path:
        raise ToyCheckpointError(f"model.path is empty: the toy preset loads a pre-trained checkpoint; {hint}")
    path = Path(path)
    for sub in ("transformer", "vae"):
        if not (path / sub / "config.json").is_file():
            raise ToyCheckpointError(f"model.path {path} is not a toy checkpoint (no {sub}/config.json); {hint}")
    return path


def build_toy(path: str | Path | None, seed: int = 0, max_sequence_length: int = 16, shift: float = 1.0,
              text: bool = True, vae: bool = True, transformer: SD3Transformer2DModel | None = None):
    """SD3Components of a pre-trained toy checkpoint (or around a given `transformer`, during pre-training)."""
    parts = empty_parts()
    if transformer is None:
        transformer = SD3Transformer2DModel.from_pretrained(check_checkpoint(path) / "transformer")
    if vae:
        parts["vae"] = load_codec(path)
    if text:
        parts.update(toy_text_stack(seed, max_sequence_length))
    for module in (transformer, *parts.values()):
        if isinstance(module, torch.nn.Module):
            module.eval()
    return SD3Components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **parts)


def load_codec(path: str | Path | None) -> PatchPCACodec:
    return PatchPCACodec.from_pretrained(check_checkpoint(path) / "vae").eval()
