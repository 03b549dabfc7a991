"""Drive a ModelRunner directly with hand-made SchedulerOutputs (no scheduler, no engine):
a whole-prompt prefill step, then decode steps, greedy. Shared by the CPU and GPU tests."""
from __future__ import annotations

import random

from pagoda.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from pagoda.sampling import SamplingParams
from pagoda.worker.model_runner import ModelRunner


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def run_greedy(runner: ModelRunner, prompts: list[list[int]], num_steps: int,
               seed: int = 0) -> list[list[int]]:
    """Greedy tokens per prompt: step 0 prefills every prompt (and samples), each later step
    decodes every request once. Blocks are handed out in a shuffled order."""
    bs = runner.block_size
    need = [blocks_needed(len(p) + num_steps, bs) for p in prompts]
    pool = list(range(sum(need)))
    random.Random(seed).shuffle(pool)
    params = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True)
    new, out = [], [[] for _ in prompts]
    for i, (p, n) in enumerate(zip(prompts, need)):
        blocks, pool = pool[:n], pool[n:]
        new.append(NewRequestData(str(i), list(p), len(p), params, (), blocks, 0))
    first = runner.execute_model(SchedulerOutput(new, [], {str(i): len(p)
                                                             for i, p in enumerate(prompts)}))
    for i in range(len(prompts)):
        out[i].extend(first.sampled_token_ids[str(i)])
    for step in range(1, num_steps):
        cached = [CachedRequestData(str(i), [], len(p) + step - 1) for i, p in enumerate(prompts)]
        res = runner.execute_model(SchedulerOutput([], cached, {str(i): 1
                                                                for i in range(len(prompts))}))
        for i in range(len(prompts)):
            out[i].extend(res.sampled_token_ids[str(i)])
    return out
