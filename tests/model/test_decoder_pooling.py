"""A decoder family's hidden states pooled as an embedding model pools them (pooling.py's LAST
and MEAN) against transformers' ``AutoModel`` ``last_hidden_state`` pooled the same way, in fp32.
pagoda's decoder runs here by hand, without the engine: a paged KV cache and prefill metadata
built in the test, each prompt prefilled in chunks of mixed sizes packed into shared steps, its
rows fed to a :class:`PoolingState` chunk by chunk, as the engine's chunked prefill will."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_VOCAB, make_model

from pagoda.attention.metadata import AttentionMetadata, PrefillChunk
from pagoda.models import pooling
from pagoda.models.loader import load_model
from pagoda.models.pooling import PoolingState, PoolingType

MIN_COSINE = 0.99999
ATOL = 1e-4
BLOCK = 4
# Prompt lengths, and the chunk sizes their prefill is cut into (each step packs the next
# chunk of every prompt still prefilling, so prompts of different progress share a step).
LENS = [3, 17, 9, 26]
CHUNK = 5


def prefill_steps(lens: list[int], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Per step, (prompt, start, length) of each chunk computed in it."""
    done = [0] * len(lens)
    steps = []
    while any(d < n for d, n in zip(done, lens, strict=True)):
        step = []
        for i, n in enumerate(lens):
            if done[i] < n:
                q = min(chunk + i % 3, n - done[i])  # chunk sizes differ per prompt
                step.append((i, done[i], q))
                done[i] += q
        steps.append(step)
    return steps


def pagoda_pooled(loaded, prompts: list[list[int]], kinds: list[PoolingType]):
    """Each prompt's pooled vectors (one per kind), computed over chunked prefill steps."""
    arch = loaded.arch
    tables, next_block = [], 1
    for p in prompts:  # block 0 stays unused
        n = -(-len(p) // BLOCK)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    caches = [
        torch.zeros(2, next_block, BLOCK, arch.num_kv_heads, arch.head_dim)
        for _ in range(arch.num_layers)
    ]
    states = {k: [PoolingState(k) for _ in prompts] for k in kinds}
    for step in prefill_steps([len(p) for p in prompts], CHUNK):
        ids, pos, slots, chunks, row = [], [], [], [], 0
        for i, start, q in step:
            span = range(start, start + q)
            ids += prompts[i][start : start + q]
            pos += list(span)
            slots += [tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in span]
            ctx = start + q
            chunks.append(PrefillChunk(row, q, ctx, torch.tensor(tables[i][: -(-ctx // BLOCK)])))
            row += q
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            num_decode_tokens=0,
            decode_block_tables=torch.zeros(0, 1, dtype=torch.int64),
            decode_seq_lens=torch.zeros(0, dtype=torch.int64),
            decode_max_seq_len=0,
            prefills=chunks,
            block_size=BLOCK,
        )
        with torch.no_grad():
            hidden = loaded.model(torch.tensor(ids), torch.tensor(pos), caches, meta)
        for kind in kinds:
            pooling.add_packed(
                [states[kind][i] for i, _, _ in step], hidden, [q for _, _, q in step]
            )
    return {k: torch.stack([s.result() for s in states[k]]) for k in kinds}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decoder_last_and_mean_pooling_match_transformers(tmp_path, family):
    import transformers

    path = make_model(str(tmp_path / family), family)
    loaded = load_model(path, torch.float32, torch.device("cpu"))
    ref_model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in LENS]
    assert max(len(s) for s in prefill_steps(LENS, CHUNK)) > 1  # steps pack several prompts
    assert max(len(p) for p in prompts) > 3 * CHUNK  # and prompts span several steps
    ours = pagoda_pooled(loaded, prompts, [PoolingType.LAST, PoolingType.MEAN])
    with torch.no_grad():
        rows = [ref_model(torch.tensor([p])).last_hidden_state[0] for p in prompts]
    ref = {
        PoolingType.LAST: torch.stack([r[-1] for r in rows]),
        PoolingType.MEAN: torch.stack([r.mean(0) for r in rows]),
    }
    for kind in ref:
        torch.testing.assert_close(ours[kind], ref[kind], atol=ATOL, rtol=0)
        cos = F.cosine_similarity(ours[kind], ref[kind], dim=-1)
        assert cos.min().item() >= MIN_COSINE, (kind, cos)
    # LAST and MEAN differ here, so each test above checks its own pooling
    assert (ref[PoolingType.LAST] - ref[PoolingType.MEAN]).abs().max() > 0.1
