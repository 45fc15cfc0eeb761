"""Vocabulary alignment: tokenizer_source base / a model / union re-indexes embedding and head rows."""

import json

import pytest
import torch
import yaml

import methods
from conftest import load, save_sharded

HIDDEN = 4


def tokenizer_json(tokens: list[str], specials: dict[str, int] | None = None) -> dict:
    """A minimal BPE tokenizer.json: `tokens` get ids 0.. in order; specials are added tokens."""
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in (specials or {}).items()],
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
    }


def model_folder(path, tokens, seed, specials=None, tied=False, extra_rows=0):
    """A tiny model whose embedding row for each token is recognisable: token index + seed/10 in column 0."""
    vocab = len(tokens) + len(specials or {}) + extra_rows
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, HIDDEN, generator=g)
    state = {"model.embed_tokens.weight": embed, "model.layers.0.mlp.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
             "model.norm.weight": torch.ones(HIDDEN)}
    if not tied:
        state["lm_head.weight"] = torch.randn(vocab, HIDDEN, generator=g)
    save_sharded(path, state, shards=1, config={"model_type": "llama", "vocab_size": vocab, "torch_dtype": "float32",
                                                "tie_word_embeddings": tied})
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, specials)))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "added_tokens_decoder": {}}))
    return state


def ids(folder) -> dict[str, int]:
    document = json.loads((folder / "tokenizer.json").read_text())
    out = dict(document["model"]["vocab"])
    out.update({e["content"]: e["id"] for e in document["added_tokens"]})
    return out


@pytest.fixture
def two_vocabularies(tmp_path):
    a = model_folder(tmp_path / "a", ["x", "y", "z", "w"], 0, specials={"<s>": 4})
    b = model_folder(tmp_path / "b", ["y", "x", "q", "z", "w", "r"], 1, specials={"<s>": 6, "<tool>": 7})
    return a, b


def test_union_merges_shared_tokens_row_by_row_and_keeps_each_models_own_tokens(tmp_path, run, two_vocabularies):
    a, b = two_vocabularies
    code, _, err = run("--method", "sma", "--models", "a", "b", "--tokenizer-source", "union", "--output", "u/")
    assert code == 0, err
    vocab = ids(tmp_path / "u")
    # the base (first model) keeps its ids; b's new tokens follow in b's order, then its added tokens
    assert [t for t, _ in sorted(vocab.items(), key=lambda e: e[1])] == ["x", "y", "z", "w", "<s>", "q", "r", "<tool>"]
    out = load(tmp_path / "u")
    a_ids = {"x": 0, "y": 1, "z": 2, "w": 3, "<s>": 4}
    b_ids = {"y": 0, "x": 1, "q": 2, "z": 3, "w": 4, "r": 5, "<s>": 6, "<tool>": 7}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (8, HIDDEN)
        for token, row in vocab.items():
            if token in a_ids and token in b_ids:
                expected = (a[name][a_ids[token]] + b[name][b_ids[token]]) / 2
            else:  # only b has it: both models take b's row
                expected = b[name][b_ids[token]]
            assert torch.allclose(out[name][row], expected, atol=1e-6), (name, token)
    assert json.loads((tmp_path / "u" / "config.json").read_text())["vocab_size"] == 8
    decoder = json.loads((tmp_path / "u" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["7"]["content"] == "<tool>" and decoder["7"]["special"] is True
    assert decoder["5"]["content"] == "q" and decoder["5"]["special"] is False


def test_base_source_keeps_the_base_vocabulary_and_fills_missing_rows_from_the_base(tmp_path, run, two_vocabularies):
    a, b = two_vocabularies
    code, _, err = run("--method", "sma", "--models", "b", "a", "--tokenizer-source", "a", "--output", "o/")
    assert code == 0, err
    assert ids(tmp_path / "o") == {"x": 0, "y": 1, "z": 2, "w": 3, "<s>": 4}
    out = load(tmp_path / "o")["model.embed_tokens.weight"]
    b_ids = {"y": 0, "x": 1, "z": 3, "w": 4, "<s>": 6}
    for token, row in ids(tmp_path / "o").items():
        assert torch.allclose(out[row], (a["model.embed_tokens.weight"][row] + b["model.embed_tokens.weight"][b_ids[token]]) / 2,
                              atol=1e-6)


def test_a_token_nobody_has_gets_zeros_and_a_token_override_can_force_a_row(tmp_path, run, two_vocabularies):
    a, b = two_vocabularies
    recipe = {"merge_method": "sma", "models": [{"model": "a"}, {"model": "b"}],
              "tokenizer": {"source": "union", "pad_to_multiple_of": 5,
                            "tokens": {"<new>": {"source": {"kind": "zero"}},
                                       "x": {"source": "b", "force": True}}}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    code, _, err = run("--config", "r.yml", "--output", "o/")
    assert code == 0, err
    vocab = ids(tmp_path / "o")
    out = load(tmp_path / "o")["model.embed_tokens.weight"]
    assert out.shape == (10, HIDDEN)  # 9 tokens padded to a multiple of 5
    assert torch.equal(out[vocab["<new>"]], torch.zeros(HIDDEN))
    assert torch.allclose(out[vocab["x"]], b["model.embed_tokens.weight"][1], atol=1e-6)  # forced: b's row for both
    real = out[:9]
    assert torch.allclose(out[9], real.mean(dim=0), atol=1e-6)


def test_union_handles_a_tied_model_through_its_embedding(tmp_path, run):
    model_folder(tmp_path / "a", ["x", "y"], 0, tied=True)
    b = model_folder(tmp_path / "b", ["y", "x", "q"], 1)
    code, _, err = run("--method", "sma", "--models", "a", "b", "--tokenizer-source", "union", "--output", "o/")
    assert code == 0, err
    out = load(tmp_path / "o")
    assert out["lm_head.weight"].shape == (3, HIDDEN)
    assert torch.allclose(out["lm_head.weight"][2], b["lm_head.weight"][2], atol=1e-6)


def test_different_vocabularies_without_a_tokenizer_source_say_what_to_do(tmp_path, run, two_vocabularies):
    code, _, err = run("--method", "sma", "--models", "a", "b", "--output", "o/")
    assert code == 2 and "--tokenizer-source union" in err and "different vocabulary sizes" in err


def test_same_sized_but_different_tokenizers_warn(tmp_path, run):
    model_folder(tmp_path / "a", ["x", "y", "z"], 0)
    model_folder(tmp_path / "b", ["z", "y", "x"], 1)
    code, _, err = run("--method", "sma", "--models", "a", "b", "--output", "o/")
    assert code == 0 and "have different tokenizers" in err


def test_a_sentencepiece_only_tokenizer_cannot_be_aligned(tmp_path, run, two_vocabularies):
    (tmp_path / "b" / "tokenizer.json").unlink()
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    code, _, err = run("--method", "sma", "--models", "a", "b", "--tokenizer-source", "union", "--output", "o/")
    assert code == 2 and "only a sentencepiece tokenizer.model" in err


def test_base_stripping_drops_ids_past_the_vocab_size(tmp_path, run):
    model_folder(tmp_path / "a", ["x", "y", "z"], 0)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["vocab_size"] = 2  # "z" (id 2) is a padding entry nobody can embed
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    model_folder(tmp_path / "b", ["x", "y", "z"], 1)
    code, _, err = run("--method", "sma", "--models", "a", "b", "--tokenizer-source", "base", "--output", "o/")
    assert code == 0, err
    assert ids(tmp_path / "o") == {"x": 0, "y": 1}
    assert load(tmp_path / "o")["model.embed_tokens.weight"].shape == (2, HIDDEN)


def test_align_vocabulary_rules_on_a_hand_case():
    a = torch.tensor([[1.0], [2.0]])  # tokens t0, t1
    b = torch.tensor([[10.0], [20.0], [30.0]])  # tokens t1, t2, t0
    index = torch.tensor([[0, 1, -1, -1], [2, 0, 1, -1]])  # output t0, t1, t2, t3
    fallback = torch.tensor([methods.MEAN_OF_HOLDERS, methods.MEAN_OF_HOLDERS, 1, methods.ZEROS])
    rows = torch.tensor([0, 0, 1, 0])
    forced = torch.tensor([False, False, False, False])
    out_a, out_b = methods.align_vocabulary([a, b], index, fallback, rows, forced, 5)
    assert out_a.flatten().tolist() == [1.0, 2.0, 20.0, 0.0, (1 + 2 + 20) / 4]
    assert out_b.flatten().tolist() == [30.0, 10.0, 20.0, 0.0, 15.0]
