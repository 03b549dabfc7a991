"""The bundled SmolLM2-135M-Instruct GGUF: greedy tokens identical to transformers loading the
same file, in several scheduling modes."""
import os

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.models.loader import default_model_path

pytestmark = pytest.mark.slow

NEW_TOKENS = 40
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "List three prime numbers and say why they are prime.",
]
MODES = {
    "default": {},
    "chunk7-block1": dict(max_num_batched_tokens=7, block_size=1),
    "no-chunked": dict(enable_chunked_prefill=False, max_num_batched_tokens=16),
    "preempt": dict(num_kv_blocks=12, max_num_batched_tokens=64),
}


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    directory, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                              dtype=torch.float32)
    prompts, refs = [], []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
        prompts.append(ids)
        refs.append(out[0, len(ids):].tolist())
    return prompts, refs


@pytest.mark.parametrize("mode", list(MODES))
def test_smollm2_greedy_matches_transformers(reference, mode):
    prompts, refs = reference
    llm = LLM(dtype="float32", **MODES[mode])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == refs
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_smollm2_chat_prompt_encoding_matches_transformers(reference):
    prompts, _ = reference
    llm = LLM(dtype="float32", num_kv_blocks=64)
    ours = [llm.engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert ours == prompts
    out = llm.chat([{"role": "user", "content": QUESTIONS[0]}],
                   SamplingParams(temperature=0, max_tokens=20))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
