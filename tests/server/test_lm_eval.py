"""lm-evaluation-harness scores a multiple-choice task through ``pagoda serve`` as it scores
it in-process: ``--model local-completions`` (echo + logprobs over batches of token-id
prompts, the tokenizer remote through /tokenizer_info, /tokenize, /detokenize) against
``--model hf`` on the same fp32 checkpoint. Each choice's log-likelihood agrees within 1e-3
and the accuracies are equal. The task is a local JSONL file: no network."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

WORDS = "river stone cloud ember lantern meadow copper harbor violet thunder".split()


def _write_task(folder: Path) -> str:
    rng = random.Random(7)
    docs = []
    for _ in range(12):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        choices = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
                   for _ in range(4)]
        docs.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "pagoda_mc.yaml").write_text(
        "task: pagoda_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return "pagoda_mc"


def _evaluate(task: str, folder: Path, model: str, model_args: dict) -> tuple[float, list]:
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(folder)), bootstrap_iters=0)
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    lls = [[r[0] for r in s["filtered_resps"]] for s in samples]
    return results["results"][task]["acc,none"], lls


def test_local_completions_scores_as_transformers_does(server, model_name, tiny_model_dir,
                                                       tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    task = _write_task(tmp_path)
    served_acc, served = _evaluate(task, tmp_path, "local-completions", {
        "base_url": server.url + "/v1/completions", "model": model_name,
        "tokenizer_backend": "remote", "num_concurrent": 1, "max_retries": 1})
    hf_acc, local = _evaluate(task, tmp_path, "hf", {
        "pretrained": tiny_model_dir, "dtype": "float32", "device": "cpu"})
    assert len(served) == len(local) == 12
    for got, want in zip(served, local):
        assert got == pytest.approx(want, abs=1e-3)
    assert served_acc == hf_acc
