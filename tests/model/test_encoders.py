"""Encoder-only models (models/bert.py, roberta.py) against Sentence Transformers and
transformers on the same tiny random checkpoints, in fp32: hidden states, embeddings with each
pooling (mean, CLS, last), normalized or not, truncated to Matryoshka dimensions, and
cross-encoder scores; every batch packs sequences of mixed lengths with no padding. bf16 is
held to a tolerance measured against fp32 (``BF16_MIN_COSINE``, ``BF16_SCORE_ATOL``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_encoders import (
    FAMILIES,
    QUERY,
    TEXTS,
    make_encoder,
    make_sentence_transformer,
    pagoda_hidden,
)
from tiny_models import make_model

from pagoda.models import pooling
from pagoda.models.config import UnsupportedModelError
from pagoda.models.encoder_loader import load_encoder
from pagoda.models.loader import load_model
from pagoda.models.pooling import PoolerConfig, PoolingConfigError

MIN_COSINE = 0.99999  # fp32, per vector
SCORE_ATOL = 1e-4  # fp32 cross-encoder scores
HIDDEN_ATOL = 1e-4  # fp32 hidden states against transformers (layer-normed, O(1) values)
# bf16 weights and activations against the fp32 reference, measured on these tiny models
# (every family, each pooling; cross-encoders of three seeds): embeddings' cosine stayed above
# 0.99996 and sigmoid scores within 0.012; the bounds leave 2x to 3x room.
BF16_MIN_COSINE = 0.9999
BF16_SCORE_ATOL = 0.02

# ST pooling mode -> the PoolerConfig it must load as.
ST_MODES = {
    "mean": pooling.PoolingType.MEAN,
    "cls": pooling.PoolingType.CLS,
    "lasttoken": pooling.PoolingType.LAST,
}


def pagoda_embed(loaded, texts, config=None):
    config = config or loaded.pooler
    hidden, batch = pagoda_hidden(loaded, texts)
    pooled = pooling.pool(hidden, batch["seq_lens"], config.pooling_type)
    return pooling.finish_embeddings(pooled, config)


def pagoda_scores(loaded, pairs):
    hidden, batch = pagoda_hidden(loaded, pairs, pairs=True)
    cls_rows = pooling.pool(hidden, batch["seq_lens"], loaded.pooler.pooling_type)
    with torch.no_grad():
        logits = loaded.model.classify(cls_rows.to(hidden.dtype))
    return pooling.scores(logits, loaded.activation, bool(loaded.pooler.use_activation))


def assert_same_vectors(ours: torch.Tensor, ref: torch.Tensor, min_cosine: float) -> None:
    assert ours.shape == ref.shape
    cos = F.cosine_similarity(ours.float(), ref.float(), dim=-1)
    assert cos.min().item() >= min_cosine, cos


@pytest.fixture(scope="module")
def st_models(tmp_path_factory):
    """(family, mode, normalize) -> (SentenceTransformer, its saved directory), made once."""
    made: dict = {}

    def get(family: str, mode: str, normalize: bool):
        key = (family, mode, normalize)
        if key not in made:
            path = str(tmp_path_factory.mktemp("st") / f"{family}-{mode}-{normalize}")
            made[key] = make_sentence_transformer(path, family, mode, normalize), path
        return made[key]

    return get


CASES = [("bert", m, n) for m in ST_MODES for n in (True, False)]
CASES += [(f, m, True) for f in ("roberta", "xlm-roberta") for m in ("mean", "cls")]
CASES += [("roberta", "lasttoken", False)]


@pytest.mark.parametrize("family,mode,normalize", CASES)
def test_embeddings_match_sentence_transformers(st_models, family, mode, normalize):
    st, path = st_models(family, mode, normalize)
    loaded = load_encoder(path)
    assert loaded.task == "embed"
    assert loaded.pooler.pooling_type is ST_MODES[mode]
    assert loaded.pooler.normalize is normalize
    ref = st.encode(TEXTS, convert_to_tensor=True, batch_size=32)  # padded to the longest
    ours = pagoda_embed(loaded, TEXTS)  # packed, no padding
    assert len(set(len(loaded.tokenizer(t)["input_ids"]) for t in TEXTS)) == len(TEXTS)
    assert_same_vectors(ours, ref, MIN_COSINE)
    norms = ours.norm(dim=-1)
    if normalize:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:  # off means off: the raw pooled vector, its length kept
        torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dims", [8, 32])
def test_matryoshka_dimensions_match_truncate_dim(st_models, dims):
    st, path = st_models("bert", "mean", True)
    loaded = load_encoder(path, pooler_override=PoolerConfig(dimensions=dims))
    ref = st.encode(TEXTS, convert_to_tensor=True, truncate_dim=dims)
    ours = pagoda_embed(loaded, TEXTS)
    assert ours.shape == (len(TEXTS), dims)
    # ST cuts after its Normalize module, pagoda (as vLLM) normalizes after cutting.
    assert_same_vectors(ours, ref, MIN_COSINE)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    too_wide = load_encoder(path, pooler_override=PoolerConfig(dimensions=65))
    with pytest.raises(PoolingConfigError, match="dimensions 65"):
        pagoda_embed(too_wide, TEXTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_transformers_whatever_they_are_packed_with(tmp_path, family):
    import transformers

    path = make_encoder(str(tmp_path / family), family)
    loaded = load_encoder(path)
    ref_model = transformers.AutoModel.from_pretrained(path).eval()
    hidden, batch = pagoda_hidden(loaded, TEXTS)
    rows = hidden.split(batch["seq_lens"])
    for text, ours in zip(TEXTS, rows, strict=True):
        enc = loaded.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            ref = ref_model(**enc).last_hidden_state[0]
        torch.testing.assert_close(ours, ref, atol=HIDDEN_ATOL, rtol=0)
    alone, _ = pagoda_hidden(loaded, TEXTS[1:2])  # the same sequence packed with no others
    torch.testing.assert_close(rows[1], alone, atol=1e-5, rtol=0)


def cross_encoder(tmp_path, family, num_labels, **overrides):
    from sentence_transformers import CrossEncoder

    path = make_encoder(str(tmp_path / f"{family}-ce{num_labels}"), family, num_labels, **overrides)
    return CrossEncoder(path, device="cpu"), path


PAIRS = [(QUERY, t) for t in TEXTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_encoder_scores_and_ranks_match(tmp_path, family):
    ce, path = cross_encoder(tmp_path, family, 1)
    loaded = load_encoder(path)
    assert loaded.task == "classify" and loaded.activation is pooling.Activation.SIGMOID
    ref = torch.as_tensor(ce.predict(PAIRS))  # sigmoid: CrossEncoder's default for 1 label
    ours = pagoda_scores(loaded, PAIRS)[:, 0]
    torch.testing.assert_close(ours, ref.float(), atol=SCORE_ATOL, rtol=0)
    assert ours.argsort(descending=True).tolist() == ref.argsort(descending=True).tolist()
    assert ref.std() > 10 * SCORE_ATOL  # the scores are far enough apart for ranks to mean it
    ce.save(path)  # ST then records its activation (v6: in its own config), pagoda reads it
    with open(os.path.join(path, "config_sentence_transformers.json")) as f:
        assert json.load(f)["activation_fn"].endswith("Sigmoid")
    assert load_encoder(path).activation is pooling.Activation.SIGMOID


def test_identity_activation_saved_by_sentence_transformers_gives_raw_logits(tmp_path):
    from sentence_transformers import CrossEncoder

    ce, path = cross_encoder(tmp_path, "bert", 1)
    CrossEncoder(path, activation_fn=torch.nn.Identity(), device="cpu").save(path)
    loaded = load_encoder(path)
    assert loaded.activation is pooling.Activation.NONE
    ref = torch.as_tensor(CrossEncoder(path, device="cpu").predict(PAIRS)).float()
    torch.testing.assert_close(pagoda_scores(loaded, PAIRS)[:, 0], ref, atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_classifier_with_several_labels_gives_softmax(tmp_path, family):
    ce, path = cross_encoder(tmp_path, family, 3)
    loaded = load_encoder(path)
    assert loaded.activation is pooling.Activation.SOFTMAX
    ref = torch.as_tensor(ce.predict(PAIRS, apply_softmax=True)).float()
    ours = pagoda_scores(loaded, PAIRS)
    torch.testing.assert_close(ours, ref, atol=SCORE_ATOL, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(len(PAIRS)))
    raw = load_encoder(path, pooler_override=PoolerConfig(use_activation=False))
    logits = torch.as_tensor(ce.predict(PAIRS)).float()  # CrossEncoder: raw logits for >1
    torch.testing.assert_close(pagoda_scores(raw, PAIRS), logits, atol=SCORE_ATOL, rtol=0)


def test_bf16_within_its_measured_tolerance(st_models, tmp_path):
    st, path = st_models("bert", "mean", True)
    ours = pagoda_embed(load_encoder(path, dtype=torch.bfloat16), TEXTS)
    assert ours.dtype == torch.float32  # pooled and finished in fp32
    assert_same_vectors(ours, st.encode(TEXTS, convert_to_tensor=True), BF16_MIN_COSINE)
    ce, ce_path = cross_encoder(tmp_path, "roberta", 1)
    ref = torch.as_tensor(ce.predict(PAIRS)).float()
    scores = pagoda_scores(load_encoder(ce_path, dtype=torch.bfloat16), PAIRS)[:, 0]
    torch.testing.assert_close(scores, ref, atol=BF16_SCORE_ATOL, rtol=0)


def test_prefixed_and_unprefixed_checkpoints_load_alike(tmp_path):
    """A BertModel saved bare and the same weights under ``bert.`` (as a task model's
    checkpoint holds its encoder) give the same hidden states."""
    from safetensors.torch import load_file, save_file

    path = make_encoder(str(tmp_path / "bare"), "bert")
    prefixed = str(tmp_path / "prefixed")
    os.makedirs(prefixed)
    for name in os.listdir(path):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(path, name), os.path.join(prefixed, name))
    weights = load_file(os.path.join(path, "model.safetensors"))
    save_file(
        {f"bert.{k}": v for k, v in weights.items()}, os.path.join(prefixed, "model.safetensors")
    )
    a, _ = pagoda_hidden(load_encoder(path), TEXTS)
    b, _ = pagoda_hidden(load_encoder(prefixed), TEXTS)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    del weights["encoder.layer.1.attention.self.key.weight"]
    save_file(weights, os.path.join(prefixed, "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights.*layer.1.attention.qkv_proj"):
        load_encoder(prefixed)


def test_decoder_and_encoder_loaders_refuse_each_other(tmp_path):
    bert = make_encoder(str(tmp_path / "bert"), "bert")
    with pytest.raises(UnsupportedModelError, match="'bert' is an encoder-only model"):
        load_model(bert, torch.float32, torch.device("cpu"))
    llama = make_model(str(tmp_path / "llama"), "llama")
    with pytest.raises(UnsupportedModelError, match="encoder model_type 'llama'.*'bert'"):
        load_encoder(llama)
    with pytest.raises(PoolingConfigError, match="needs a classifier head"):
        load_encoder(bert, task="score")
