import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastmgrpo.models import decoder, lm_head, load_model, stop_token_ids
from fastmgrpo.testing import build_tiny_model


MATH = "Q: Tom has 3 boxes of 12 pens, gives away 5.\nHow many?\n3 * 12 = 36; 36 - 5 = 31\n#### 31"


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_save_load_round_trip_gives_identical_logits(arch, tmp_path):
    model, tok = build_tiny_model(arch=arch, seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    ids = torch.tensor([tok.encode(MATH)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok2.encode(MATH) == tok.encode(MATH)
    assert tok2.decode(tok2.encode(MATH)) == MATH
    assert tok2.chat_template == tok.chat_template
    assert stop_token_ids(tok2) == stop_token_ids(tok)


def test_tiny_models_are_seeded_and_sized():
    a, tok = build_tiny_model(arch="gemma3", seed=0)
    b, _ = build_tiny_model(arch="gemma3", seed=0)
    c, _ = build_tiny_model(arch="gemma3", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    big, _ = build_tiny_model(arch="llama", vocab_size=1000)
    assert big.get_input_embeddings().weight.shape == (1000, 64)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_model(vocab_size=10)
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_model(arch="gpt2")


def test_missing_path_raises_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(str(missing), dtype=torch.float32, device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"), dtype=torch.float32, device="cpu")


def test_tokenizer_round_trips_math_text():
    _, tok = build_tiny_model()
    for text in [MATH, "#### -1,234.50", "a\tb\n\n  c", "x^2 + (y/3) = {z}; 100% $5 @home ~ok!"]:
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode("12") == [tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")]
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"


def test_stop_token_ids():
    _, tok = build_tiny_model()
    assert stop_token_ids(tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
    assert tok.eos_token_id == 1 and tok.convert_tokens_to_ids("<end_of_turn>") == 5


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_lm_head_and_decoder_reproduce_logits(arch):
    model, tok = build_tiny_model(arch=arch, vocab_size=200)
    ids = torch.tensor([tok.encode(MATH)])
    w, b = lm_head(model)
    assert w.shape == (200, 64) and b is None
    with torch.no_grad():
        hidden = decoder(model)(input_ids=ids).last_hidden_state  # (1, L, H)
        torch.testing.assert_close(hidden @ w.T, model(ids).logits)


def test_lm_head_rejects_softcapping_and_logit_scale():
    model, _ = build_tiny_model(arch="gemma3")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head(model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        decoder(model)
    model, _ = build_tiny_model(arch="llama")
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        lm_head(model)


def _write_tiny_gguf(path):
    """A 1-layer float32 llama GGUF with a 27-token character vocab (written with `gguf`)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + list("abcdefghij0123456789 +=\n")
    vocab, hidden, ffn, heads, kv_heads = len(tokens), 32, 64, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden), "blk.0.attn_q": (hidden, hidden),
              "blk.0.attn_k": (kv, hidden), "blk.0.attn_v": (kv, hidden), "blk.0.attn_output": (hidden, hidden),
              "blk.0.ffn_gate": (ffn, hidden), "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (0.1 * rng.standard_normal(shape)).astype(np.float32))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_path)
    monkeypatch.setenv("FASTMGRPO_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(gguf_path), dtype=torch.float32, device="cpu")
    (cached,) = (tmp_path / "cache").iterdir()  # one directory, no temp leftovers
    assert cached.name.startswith("tiny-")
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert getattr(model, "hf_quantizer", None) is None
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ids = torch.tensor([tok.encode("12+3=15\nab")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    again, _ = load_model(str(gguf_path), dtype=torch.float32, device="cpu")
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp  # read, not rewritten
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
