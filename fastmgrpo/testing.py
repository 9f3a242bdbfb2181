"""Tiny random-initialised models and an offline tokenizer, built from a config in code.

Tests and CPU benchmarks use them instead of downloaded weights: a character-level tokenizer
with a Gemma-style chat template, and 2-layer Gemma 3 / Llama models (hidden 64). Also the
padded reference of `policy.packed_hidden_states` (its tests' reference, the benchmarks' peer) and
a text-hash reward that gives random-weight models' groups signal.
"""

from __future__ import annotations

import string
import zlib

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, PreTrainedTokenizerFast

from fastmgrpo.models import decoder
from fastmgrpo.types import Episode

# Gemma 3 turn format of the tiny tokenizer. (The default 270M checkpoint is the base model: it
# does not follow this format, so it gets no chat template.) A system message is
# folded into the first user turn, as Gemma's own template does.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ns.prefix + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_TINY_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level offline tokenizer over printable ASCII, with a Gemma-style chat template.

    Ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <start_of_turn>=4 <end_of_turn>=5, then one id per
    printable ASCII character (letters, digits, punctuation, space, \\n, \\t, \\r, \\v, \\f).
    Encoding/decoding of ASCII text is lossless; no bos is added by `encode`.
    """
    chars = list(dict.fromkeys(string.printable))
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS + chars)}
    # BPE without merges over characters: each character is its own token; Fuse joins them back.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(_TINY_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


def build_tiny_model(
    *, vocab_size: int | None = None, seed: int = 0, arch: str = "gemma3"
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A tiny random-initialised causal LM (hidden 64, 2 layers, 4 heads, 2 kv heads, fp32, eval).

    vocab_size: embedding rows (default: the tokenizer's size; larger values add unused rows).
    arch: "gemma3" (layer 0 sliding window 16, layer 1 full attention, tied embeddings),
        "llama" (untied head) or "mistral" (no layer_types: every layer slides over 8 tokens). Deterministic given `seed`; saves/loads with save_pretrained.
    """
    tokenizer = build_tiny_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "gemma3":
        config = Gemma3TextConfig(
            **common, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16, final_logit_softcapping=None, tie_word_embeddings=True,
        )
    elif arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'gemma3', 'llama' or 'mistral'")
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), tokenizer


def padded_hidden_states(model: torch.nn.Module, episodes: list[Episode]) -> torch.Tensor:
    """Reference for `policy.packed_hidden_states`: the same (T, H) rows computed from a right-padded
    (B, max_len) batch with an attention mask, padding rows dropped."""
    device = model.get_input_embeddings().weight.device
    lengths = [e.num_tokens for e in episodes]
    width = max(lengths)
    ids = torch.zeros((len(episodes), width), dtype=torch.int64)  # (B, L)
    mask = torch.zeros((len(episodes), width), dtype=torch.int64)  # (B, L)
    for r, e in enumerate(episodes):
        ids[r, : lengths[r]] = torch.tensor(e.prompt_ids + e.completion_ids)
        mask[r, : lengths[r]] = 1
    out = decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.last_hidden_state[mask.to(device).bool()]  # (T, H) row-major = packed order


def hash_reward(text: str, problem, format_weight: float = 0.0, earlier=(), *, modulus: int = 2):
    """A deterministic, text-dependent stand-in for `rewards.score`: right for about 1/modulus of
    the texts, so random-weight models get groups with non-zero advantages. Returns (reward, ok)."""
    ok = zlib.crc32(text.encode()) % modulus == 0
    return float(ok), ok
