"""The tiny presets' text stack, built in code (nothing downloaded): seeded random-init CLIP-with-projection x2 and
T5 encoders, a byte-level CLIP tokenizer (256 byte symbols, their `</w>` variants, start/end; no merges) and a
character-level T5 unigram tokenizer. The toy preset reuses the encoders with word-level vocabularies.
"""

from __future__ import annotations

from transformers import (
    CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer,
)

from drm_ray.models.components import seeded

CLIP_MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map, in byte order of the printable run first."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def byte_clip_vocab() -> dict[str, int]:
    """start, end, the 256 byte symbols and their end-of-word variants: 514 tokens."""
    symbols = _byte_symbols()
    return {"<|startoftext|>": 0, "<|endoftext|>": 1, **{s: i + 2 for i, s in enumerate(symbols)},
            **{s + "</w>": i + 258 for i, s in enumerate(symbols)}}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=byte_clip_vocab(), merges=[], model_max_length=CLIP_MAX_LENGTH)  # 514 tokens


def tiny_t5_tokenizer(max_length: int) -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(chr(c), -1.0) for c in range(33, 127)] + [("\u2581", -2.0)]  # printable ASCII + the word marker
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)  # 98 tokens


def tiny_text_encoders(seed: int, clip_vocab: int = 514, t5_vocab: int = 98,
                       clip_length: int = CLIP_MAX_LENGTH) -> dict:
    """Seeded random-init CLIP-with-projection x2 (hidden 32, projection 32) and T5 (d_model 64), 2 layers each."""
    def clip_config():
        return CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=32, max_position_embeddings=clip_length,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return dict(
        text_encoder=seeded(seed + 2, lambda: CLIPTextModelWithProjection(clip_config())),
        text_encoder_2=seeded(seed + 3, lambda: CLIPTextModelWithProjection(clip_config())),
        text_encoder_3=seeded(seed + 4, lambda: T5EncoderModel(T5Config(
            vocab_size=t5_vocab, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))),
    )


def tiny_text_stack(seed: int, max_sequence_length: int) -> dict:
    """Encoders and tokenizers of the tiny preset, as SD3Components members."""
    return dict(**tiny_text_encoders(seed), tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
                tokenizer_3=tiny_t5_tokenizer(max_sequence_length))
