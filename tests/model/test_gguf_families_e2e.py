"""GGUF files of the qwen3moe, phi3, gemma2 and gemma3 architectures, end to end: a tiny random
checkpoint written as llama.cpp's converter writes it (tests/gguf_writer.py, F32 tensors) and
served by pagoda from the .gguf gives, in fp32, the greedy tokens transformers gives on the
original checkpoint, also with chunked prefill and preemption. The tokenizer comes from the
file's vocabulary."""
import random

import pytest
import torch
import transformers

from gguf_writer import write_gguf
from pagoda import LLM
from tiny_models import TINY_VOCAB, greedy, hf_greedy, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
# case: (model_type, overrides, max_model_len, prompt lengths). Phi-4-mini-like: partial rotary
# and LongRoPE past its original context of 32 (long factors, prompts beyond 32 as transformers
# needs for them); Gemma with the query scale llama.cpp uses (head_dim), Gemma 3 with a global
# layer in six and linearly scaled global RoPE; windows of 8 so that the prompts slide.
CASES = {
    "qwen3_moe": ("qwen3_moe", {}, None, [3, 17, 40]),
    "phi4-mini": ("phi3", dict(partial_rotary_factor=0.75, max_position_embeddings=512,
                               original_max_position_embeddings=32, rope_scaling=LONGROPE),
                  512, [33, 40, 47]),
    "phi3-4k": ("phi3", dict(sliding_window=8), None, [3, 17, 40]),
    "gemma2": ("gemma2", dict(tie_word_embeddings=True, query_pre_attn_scalar=16), None,
               [3, 17, 40]),
    "gemma3": ("gemma3_text", dict(query_pre_attn_scalar=16, num_hidden_layers=6,
                                   sliding_window_pattern=6,
                                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
               None, [3, 17, 40]),
}
MAX_TOKENS = [20, 9, 14]
MODES = {
    "default": {},
    "budget7": dict(max_num_batched_tokens=7),
    # 8 blocks x 8 tokens hold the longest request (54 tokens) but not all three at once
    # (sized for arrival-order admission: --short-prefill-tokens 0).
    "preempt": dict(block_size=8, num_kv_blocks=8, max_num_batched_tokens=32,
                    short_prefill_tokens=0),
}


@pytest.fixture(scope="module", params=list(CASES))
def gguf_case(request, tmp_path_factory):
    model_type, overrides, max_model_len, lens = CASES[request.param]
    seed = 60 + list(CASES).index(request.param)
    path = make_model(str(tmp_path_factory.mktemp(request.param)), model_type, seed=seed,
                      **overrides)
    write_gguf(path, f"{path}/model.gguf")
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in lens]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    return f"{path}/model.gguf", max_model_len, prompts, refs


@pytest.mark.parametrize("mode", list(MODES))
def test_gguf_greedy_matches_transformers(gguf_case, mode):
    path, max_model_len, prompts, refs = gguf_case
    llm = LLM(path, dtype="float32", max_model_len=max_model_len, **MODES[mode])
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_invariants()


def test_gguf_tokenizer_is_the_checkpoint_s(gguf_case):
    """The byte-level vocabulary written into the file tokenizes as the checkpoint's own."""
    path, max_model_len, _, _ = gguf_case
    llm = LLM(path, dtype="float32", max_model_len=max_model_len)
    ref = transformers.AutoTokenizer.from_pretrained(path.rsplit("/", 1)[0])
    text = "Paged attention keeps the KV cache in fixed-size blocks. 0123"
    assert llm.engine.tokenizer.encode(text) == ref.encode(text)
