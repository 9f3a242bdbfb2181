import pytest
import torch

from fastmgrpo.models import build_tiny_model, decoder, lm_head, load_model, stop_token_ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids spin-waiting (100x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
