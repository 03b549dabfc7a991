"""--runner / --convert resolved against a checkpoint's config.json (engine/pooling_model.py),
vLLM's rules: pooling for encoders and *Model / *ForSequenceClassification architectures;
and PoolingParams' own checks (each error names the field or flag)."""

from __future__ import annotations

import json

import pytest

from pagoda.config import EngineArgs
from pagoda.engine.pooling_model import choose_runner
from pagoda.pooling_params import PoolingParams


def _checkpoint(tmp_path, model_type: str, architecture: str) -> str:
    path = tmp_path / architecture
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": model_type, "architectures": [architecture]})
    )
    return str(path)


@pytest.mark.parametrize(
    "model_type,architecture,runner,convert,kind,task",
    [
        ("llama", "LlamaForCausalLM", "auto", "auto", "generate", None),
        ("qwen3", "Qwen3Model", "auto", "auto", "pooling", "embed"),
        ("mistral", "MistralEmbeddingModel", "auto", "auto", "pooling", "embed"),
        ("qwen3", "Qwen3ForSequenceClassification", "auto", "auto", "pooling", "classify"),
        ("llama", "LlamaForCausalLM", "pooling", "auto", "pooling", "embed"),
        ("llama", "LlamaForCausalLM", "auto", "embed", "pooling", "embed"),
        ("qwen3", "Qwen3Model", "generate", "auto", "generate", None),
        ("bert", "BertModel", "auto", "auto", "pooling", "embed"),
        ("xlm-roberta", "XLMRobertaForSequenceClassification", "auto", "auto", "pooling",
         "classify"),
    ],
)  # fmt: skip
def test_runner_choice(tmp_path, model_type, architecture, runner, convert, kind, task):
    path = _checkpoint(tmp_path, model_type, architecture)
    choice = choose_runner(EngineArgs(model=path, runner=runner, convert=convert))
    assert (choice.kind, choice.task) == (kind, task)
    assert choice.encoder is (model_type in ("bert", "xlm-roberta"))


def test_overrides_choose_the_reranker_and_refuse_shape_keys(tmp_path):
    path = _checkpoint(tmp_path, "qwen3", "Qwen3ForCausalLM")
    overrides = {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": ["no", "yes"],
        "is_original_qwen3_reranker": True,
    }
    choice = choose_runner(EngineArgs(model=path, hf_overrides=overrides))
    assert (choice.kind, choice.task) == ("pooling", "classify")
    with pytest.raises(ValueError, match="--hf-overrides key 'num_hidden_layers'"):
        choose_runner(EngineArgs(model=path, hf_overrides={"num_hidden_layers": 1}))


def test_flag_errors_name_the_flag(tmp_path):
    bert = _checkpoint(tmp_path, "bert", "BertModel")
    with pytest.raises(ValueError, match="--runner generate: model_type 'bert' is an encoder"):
        choose_runner(EngineArgs(model=bert, runner="generate"))
    for kwargs, flag in [
        (dict(runner="pool"), "--runner"),
        (dict(convert="reward"), "--convert"),
        (dict(runner="generate", convert="embed"), "--convert embed needs --runner pooling"),
        (dict(pooler_config="MEAN"), "--pooler-config"),
        (dict(hf_overrides=["x"]), "--hf-overrides"),
    ]:
        with pytest.raises(ValueError, match=flag):
            EngineArgs(**kwargs)


def test_pooling_params_checks_name_the_field():
    assert PoolingParams().n == 1 and PoolingParams().task == "embed"
    for kwargs, field in [
        (dict(task="generate"), "task"),
        (dict(dimensions=0), "dimensions"),
        (dict(dimensions=True), "dimensions"),
        (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
        (dict(normalize="yes"), "normalize"),
        (dict(activation=1), "activation"),
        (dict(task="score", dimensions=8), "dimensions applies to task 'embed'"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}"):
            PoolingParams(**kwargs)
