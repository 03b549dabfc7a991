"""pooling.py on its own: packed pooling against each sequence pooled alone, the chunk-
accumulating PoolingState against pooling the whole sequence, the pooler config's layers
(task defaults, a Sentence Transformers directory, --pooler-config) and what each refuses,
the classifier's activation, Matryoshka truncation before normalization."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from pagoda.models import pooling
from pagoda.models.pooling import (
    Activation,
    PoolerConfig,
    PoolingConfigError,
    PoolingState,
    PoolingType,
)

LENS = [1, 7, 3, 12, 2]
E = 16


def packed_hidden(lens: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(sum(lens), E, generator=torch.Generator().manual_seed(1)).to(dtype)


def one_alone(rows: torch.Tensor, kind: PoolingType) -> torch.Tensor:
    rows = rows.float()
    return {
        PoolingType.CLS: rows[0],
        PoolingType.LAST: rows[-1],
        PoolingType.MEAN: rows.mean(0),
        PoolingType.ALL: rows,
    }[kind]


@pytest.mark.parametrize("kind", list(PoolingType))
def test_packed_pooling_is_each_sequence_pooled_alone(kind):
    hidden = packed_hidden(LENS)
    pooled = pooling.pool(hidden, LENS, kind)
    for i, rows in enumerate(hidden.split(LENS)):
        torch.testing.assert_close(pooled[i], one_alone(rows, kind), atol=1e-6, rtol=0)


def test_mean_of_bf16_rows_is_summed_in_fp32():
    hidden = packed_hidden([300], torch.bfloat16) + 8.0  # a bf16 running sum would drift
    pooled = pooling.pool(hidden, [300], PoolingType.MEAN)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[0], hidden.double().mean(0).float(), atol=1e-5, rtol=0)


def test_seq_lens_must_tile_the_rows():
    with pytest.raises(ValueError, match="do not tile"):
        pooling.pool(packed_hidden([4]), [2, 1], PoolingType.MEAN)
    with pytest.raises(ValueError, match="do not tile"):
        pooling.pool(packed_hidden([4]), [4, 0], PoolingType.CLS)


def random_cuts(n: int, rng: random.Random) -> list[int]:
    """A split of n rows into chunks of random sizes (>= 1)."""
    cuts, left = [], n
    while left:
        cuts.append(rng.randint(1, left))
        left -= cuts[-1]
    return cuts


@pytest.mark.parametrize("kind", list(PoolingType))
def test_chunked_pooling_equals_whole(kind):
    """Sequences prefilled in chunks of random sizes, several sequences' chunks packed into
    each step, pool to what the whole sequences pool to."""
    rng = random.Random(7)
    hidden = packed_hidden(LENS)
    whole = pooling.pool(hidden, LENS, kind)
    seqs = list(hidden.split(LENS))
    chunks = [list(s.split(random_cuts(len(s), rng))) for s in seqs]
    assert max(len(c) for c in chunks) > 2
    states = [PoolingState(kind) for _ in LENS]
    while any(chunks):  # a step: the next chunk of every sequence that has one left
        live = [i for i, c in enumerate(chunks) if c]
        step = [chunks[i].pop(0) for i in live]
        pooling.add_packed([states[i] for i in live], torch.cat(step), [len(c) for c in step])
    for i, state in enumerate(states):
        torch.testing.assert_close(state.result(), whole[i], atol=1e-6, rtol=0)


def test_empty_state_refuses_a_result_and_empty_chunks_are_no_rows():
    state = PoolingState(PoolingType.MEAN)
    state.add(torch.zeros(0, E))
    with pytest.raises(ValueError, match="no rows"):
        state.result()
    state.add(torch.ones(2, E))
    state.add(torch.zeros(0, E))
    torch.testing.assert_close(state.result(), torch.ones(E))


# --- configuration ---------------------------------------------------------------------------


def test_pooler_config_reads_vllm_keys_and_refuses_the_rest():
    c = PoolerConfig.from_dict(
        {"pooling_type": "mean", "normalize": False, "dimensions": 8, "use_activation": True}
    )
    assert c == PoolerConfig(PoolingType.MEAN, False, 8, True)
    assert PoolerConfig.from_dict({"seq_pooling_type": "CLS"}).pooling_type is PoolingType.CLS
    with pytest.raises(PoolingConfigError, match="'step_tag_id' is not supported"):
        PoolerConfig.from_dict({"step_tag_id": 3})
    with pytest.raises(PoolingConfigError, match="unknown pooler config key 'normalise'"):
        PoolerConfig.from_dict({"normalise": True})
    with pytest.raises(PoolingConfigError, match="pooling_type 'MAX' is not one of"):
        PoolerConfig.from_dict({"pooling_type": "MAX"})
    with pytest.raises(PoolingConfigError, match="dimensions must be a positive integer"):
        PoolerConfig.from_dict({"dimensions": 0})
    with pytest.raises(PoolingConfigError, match="'normalize' must be true or false"):
        PoolerConfig.from_dict({"normalize": "yes"})


@pytest.mark.parametrize(
    "task,encoder,expected",
    [
        ("embed", True, PoolerConfig(PoolingType.CLS, normalize=True)),
        ("embed", False, PoolerConfig(PoolingType.LAST, normalize=True)),
        ("classify", True, PoolerConfig(PoolingType.CLS, normalize=False, use_activation=True)),
        ("score", False, PoolerConfig(PoolingType.LAST, normalize=False, use_activation=True)),
    ],
)
def test_task_defaults(task, encoder, expected):
    assert pooling.resolve_pooler_config(None, task, encoder) == expected
    with pytest.raises(PoolingConfigError, match="task 'generate'"):
        pooling.default_pooler_config("generate", encoder)


def write_st(path, pooling_config: dict, normalize: bool, extra: tuple[str, ...] = ()) -> str:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    kinds = (["Normalize"] if normalize else []) + list(extra)
    for i, kind in enumerate(kinds, start=2):
        modules.append(
            {
                "idx": i,
                "name": str(i),
                "path": f"{i}_{kind}",
                "type": f"sentence_transformers.models.{kind}",
            }
        )
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling_config, f)
    return str(path)


def test_sentence_transformers_config_sits_between_defaults_and_override(tmp_path):
    path = write_st(tmp_path, {"word_embedding_dimension": E, "pooling_mode": "mean"}, False)
    assert pooling.resolve_pooler_config(path, "embed", encoder=True) == PoolerConfig(
        PoolingType.MEAN, normalize=False
    )  # no Normalize module: not normalized
    over = PoolerConfig(normalize=True, dimensions=4)
    assert pooling.resolve_pooler_config(path, "embed", True, over) == PoolerConfig(
        PoolingType.MEAN, normalize=True, dimensions=4
    )
    # a classifier pools what its head reads, whatever an embedding Pooling module says
    assert pooling.resolve_pooler_config(path, "classify", True).pooling_type is PoolingType.CLS


@pytest.mark.parametrize(
    "config,kind",
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, PoolingType.CLS),
        ({"pooling_mode_mean_tokens": True}, PoolingType.MEAN),
        ({"pooling_mode_lasttoken": True}, PoolingType.LAST),
        ({"pooling_mode": "lasttoken"}, PoolingType.LAST),
    ],
)
def test_sentence_transformers_pooling_modes_old_and_new(tmp_path, config, kind):
    path = write_st(tmp_path, config, True)
    assert pooling.read_st_pooler_config(path) == PoolerConfig(kind, normalize=True)


@pytest.mark.parametrize(
    "config,match",
    [
        ({"pooling_mode": "max"}, r"\['max'\] is not supported"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "only one of"),
        ({"pooling_mode_weightedmean_tokens": True}, "weightedmean"),
        ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt"),
    ],
)
def test_sentence_transformers_poolings_pagoda_cannot_follow_are_refused(tmp_path, config, match):
    with pytest.raises(PoolingConfigError, match=match):
        pooling.read_st_pooler_config(write_st(tmp_path, config, False))


def test_sentence_transformers_modules_beyond_pooling_are_refused(tmp_path):
    path = write_st(tmp_path, {"pooling_mode": "cls"}, True, extra=("Dense",))
    with pytest.raises(PoolingConfigError, match="module 'Dense'.*not supported"):
        pooling.resolve_pooler_config(path, "embed", encoder=True)
    assert pooling.read_st_pooler_config(str(tmp_path / "nowhere")) is None


@pytest.mark.parametrize(
    "hf,labels,st,expected",
    [
        ({}, 1, {}, Activation.SIGMOID),
        ({}, 3, {}, Activation.SOFTMAX),
        ({"problem_type": "regression"}, 1, {}, Activation.NONE),
        ({"problem_type": "multi_label_classification"}, 3, {}, Activation.SIGMOID),
        ({}, 1, {"activation_fn": "torch.nn.modules.linear.Identity"}, Activation.NONE),
        (
            {"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"}},
            3,
            {},
            Activation.SIGMOID,
        ),
        (
            {"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"},
            1,
            {},
            Activation.NONE,
        ),
        ({}, 0, {}, Activation.NONE),
    ],
)
def test_classifier_activation(hf, labels, st, expected):
    assert pooling.classifier_activation(hf, labels, st) is expected


def test_unknown_activation_is_refused():
    with pytest.raises(PoolingConfigError, match="activation_fn 'torch.nn.Tanh'"):
        pooling.classifier_activation({}, 1, {"activation_fn": "torch.nn.Tanh"})


def test_matryoshka_truncates_then_normalizes():
    pooled = torch.randn(3, E, generator=torch.Generator().manual_seed(2))
    out = pooling.finish_embeddings(pooled, PoolerConfig(normalize=True, dimensions=4))
    torch.testing.assert_close(out, torch.nn.functional.normalize(pooled[:, :4], dim=-1))
    raw = pooling.finish_embeddings(pooled, PoolerConfig(normalize=False))
    torch.testing.assert_close(raw, pooled, atol=0, rtol=0)
    with pytest.raises(PoolingConfigError, match="dimensions 17 is larger"):
        pooling.finish_embeddings(pooled, PoolerConfig(dimensions=17))


def test_scores_apply_the_activation_unless_told_not_to():
    logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.bfloat16)
    torch.testing.assert_close(
        pooling.scores(logits, Activation.SOFTMAX), torch.softmax(logits.float(), -1)
    )
    torch.testing.assert_close(
        pooling.scores(logits, Activation.SIGMOID), torch.sigmoid(logits.float())
    )
    assert pooling.scores(logits, Activation.SIGMOID, use_activation=False).dtype == torch.float32
    torch.testing.assert_close(pooling.scores(logits, Activation.SOFTMAX, False), logits.float())
