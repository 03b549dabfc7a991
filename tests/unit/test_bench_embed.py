"""``pagoda bench embed`` on tiny presets, a few texts: the JSON's fields, the check against
Sentence Transformers passing, and a deliberately wrong pagoda vector failing the command."""

from __future__ import annotations

import json

import torch

from pagoda.bench import embed, embed_models
from pagoda.entrypoints.cli import main

TINY = ["--num-texts", "6", "--rounds", "1", "--max-tokens", "40", "--dtype", "float32"]


def _run(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    rc = main(["bench", "embed", *TINY, *args, "--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


def test_embed_json_has_every_run_and_the_check_passed(tmp_path):
    rc, report = _run(tmp_path, "--model-preset", "tiny-bert")
    assert rc == 0
    assert report["task"] == "embed" and report["dtype"] == "float32"
    assert report["check"]["passed"] and report["check"]["tolerance"] == "fp32"
    worst = report["check"]["worst"]
    assert set(worst) == {"pagoda_offline", "pagoda_server"}
    assert min(worst.values()) >= embed.MIN_COSINE["fp32"]
    assert report["check"]["max_cross_cosine"] < embed.MIN_COSINE["fp32"]  # a sharp check
    for run in embed.RUNS:
        (r,) = report["rounds"][run]
        for key in ("texts_per_s", "tokens_per_s", "fraction_of_limit", "elapsed_s"):
            assert r[key] > 0, (run, key)
    st = report["rounds"]["sentence_transformers"][0]
    assert st["padding_overhead"] >= 1.0 and st["padded_tokens"] >= st["counted_tokens"]
    assert report["workload"]["real_tokens"] == st["counted_tokens"]  # same tokenizer
    for run in embed.PAGODA_RUNS:
        assert report["summary"][f"{run}_over_st"] > 0
    assert report["limit_flops_per_s"] > 0


def test_rerank_and_a_decoder_embedder_without_the_server(tmp_path):
    rc, report = _run(tmp_path, "--model-preset", "tiny-bert", "--task", "rerank", "--no-server")
    assert rc == 0 and report["task"] == "rerank"
    assert report["check"]["worst"]["pagoda_offline"] <= embed.SCORE_ATOL["fp32"]
    assert report["workload"]["num_texts"] == 6 and "pagoda_server" not in report["rounds"]
    rc, report = _run(tmp_path, "--model-preset", "tiny-qwen3", "--no-server")
    assert rc == 0 and report["model_preset"] == "tiny-qwen3"


def test_a_wrong_pagoda_vector_fails_the_command(tmp_path, monkeypatch, capsys):
    honest = embed.pagoda_offline

    def swapped(llm):
        run = honest(llm)

        def wrong(setup):
            result = run(setup)
            result.outputs[[0, 1]] = result.outputs[[1, 0]]  # two texts' vectors swapped
            return result

        return wrong

    monkeypatch.setattr(embed, "pagoda_offline", swapped)
    rc, report = _run(tmp_path, "--model-preset", "tiny-bert", "--no-server")
    assert rc == 1 and not report
    err = capsys.readouterr().err
    assert "text 0's vector has cosine" in err or "text 1's vector has cosine" in err


def test_checks_name_the_text_or_document():
    ref = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert embed.check_vectors(ref.clone(), ref, 0.99999, "x") > 0.99999
    bad = ref.clone()
    bad[2] = -bad[2]
    try:
        embed.check_vectors(bad, ref, 0.999, "x")
    except embed.MismatchError as e:
        assert "text 2" in str(e)
    else:
        raise AssertionError("a flipped vector passed")
    scores = torch.tensor([0.1, 0.5, 0.9])
    assert embed.check_scores(scores + 1e-5, scores, 1e-4, "y") < 1e-4
    try:
        embed.check_scores(scores + torch.tensor([0.0, 0.0, 0.1]), scores, 1e-4, "y")
    except embed.MismatchError as e:
        assert "document 2" in str(e)
    else:
        raise AssertionError("a wrong score passed")


def test_word_texts_have_exact_token_counts(tmp_path):
    preset = embed_models.PRESETS["tiny-bert"]
    from transformers import AutoTokenizer

    embed_models.save_word_tokenizer(str(tmp_path), preset)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))  # as both engines load it
    lengths = embed_models.token_lengths(5, 16, 60, 0)
    texts = embed_models.preset_texts(preset, lengths, 0)
    assert [len(tok(t)["input_ids"]) for t in texts] == lengths
    docs = embed_models.preset_texts(preset, lengths, 0, pair_with=4)
    query = embed_models.word_texts(1000, preset.specials, [4], 1)[0]
    pair = tok(query, docs[0])
    assert len(pair["input_ids"]) == lengths[0] and 1 in pair["token_type_ids"]
