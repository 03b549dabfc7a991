"""A tiny real checkpoint whose greedy answer is a script: for API features that depend on
what the model writes (reasoning tags, tool calls), tested end to end through the engine.
``make_scripted_model(path)`` writes the reasoning script below; ``script=`` another one,
e.g. one of ``TOOL_SCRIPTS`` (a tool-call format's calls, several tokens each, so that
their arguments arrive in pieces).

The model is a Qwen3 (transformers' own class, loaded by pagoda as any checkpoint) whose
attention and MLP outputs are zero, so each position's final hidden state is its own token's
embedding; the output projection maps the embedding of each script token to the next one.
The script's pieces are single added tokens, so each token has one successor and greedy
decoding writes the script after the chat template's generation prompt, then ends the turn.
The chat template is Qwen3-shaped (ChatML turns, hermes tools in the system turn,
``enable_thinking: false`` closing an empty think block, ``reasoning_effort`` in the system
turn), written for these tests.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from tiny_models import make_tokenizer

END_OF_TURN = "<|im_end|>"
SPECIAL = ["<|im_start|>", END_OF_TURN, "<think>", "</think>", "<tool_call>", "</tool_call>"]

TEMPLATE = (
    "{% if tools or reasoning_effort is defined %}<|im_start|>system\n"
    "{% if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}\n{% endif %}"
    "{% if tools %}<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>"
    "{% endif %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)

REASONING = "Oslo is in Norway, so I check the weather there."
LEAD = "The weather:"
CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}
# What the model writes after "<|im_start|>assistant\n", piece by piece.
SCRIPT = ["<think>", REASONING, "</think>", LEAD, "<tool_call>", json.dumps(CALL),
          "</tool_call>"]

# Tool-call formats as models write them: text before (where the format has any), a call
# of get_weather and one of get_time, each cut into several tokens.
TOOL_SCRIPTS: dict[str, list[str]] = {
    "hermes": ["Let me check. ", "<tool_call>", '\n{"name": "get_weather", ',
               '"arguments": {"city": ', '"Oslo", ', '"unit": "C"}}', "\n</tool_call>",
               "\n<tool_call>", '\n{"name": "get_time", "arguments": ', '{"zone": "CET"}}',
               "\n</tool_call>\n"],
    "pythonic": ['[get_weather(city="Oslo", ', 'unit="C"), ', 'get_time(zone="CET")]'],
    "qwen3_coder": ["Checking both.", "\n<tool_call>\n<function=get_weather>\n",
                    "<parameter=city>\nOslo\n</parameter>\n",
                    "<parameter=unit>\nC\n</parameter>\n", "<parameter=days>\n3\n</parameter>\n",
                    "</function>\n</tool_call>", "\n<tool_call>\n<function=get_time>\n",
                    "<parameter=zone>\nCET\n</parameter>\n", "</function>\n</tool_call>\n"],
}
# Mistral v11+, whose markers are special tokens (decoded only when the tool parser keeps
# them): one call, as the chain has each token once.
MISTRAL_SCRIPT = ["Checking. ", "[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": "Oslo", ',
                  '"unit": "C"}']
MISTRAL_SPECIAL = ("[TOOL_CALLS]", "[ARGS]")
# tool_choice "required": the JSON list its grammar allows, written as the model would.
REQUIRED_SCRIPT = ['[{"name": "get_weather", ', '"parameters": {"city": ', '"Oslo", ',
                   '"unit": "C"}}]']


def make_scripted_model(path: str, script: list[str] = SCRIPT, template: str = TEMPLATE,
                        special: tuple[str, ...] = ()) -> str:
    """Save the scripted Qwen3 and its tokenizer (chat template ``template``; ``special``:
    pieces that are special tokens, which decoding skips unless asked not to) to ``path``."""
    import transformers

    tok = make_tokenizer(path)
    specials = SPECIAL[:2] + list(special)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([p for p in SPECIAL[2:] + script if p not in specials])
    tok.eos_token = END_OF_TURN
    tok.chat_template = template
    tok.save_pretrained(path)
    ids = _script_ids(tok, script)
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        bos_token_id=tok.convert_tokens_to_ids("<s>"), eos_token_id=ids[-1],
        tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(config)
    _write_script(model, ids)
    model.save_pretrained(path)
    return path


def _script_ids(tok: Any, script: list[str]) -> list[int]:
    """The token chain: the generation prompt's last token, each piece, the end of turn."""
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": text}],
                                                  tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
               for text in ("hi", "What is the weather in Oslo?")]
    last = {p[-1] for p in prompts}
    assert len(last) == 1, "the generation prompt must end in one token"
    pieces = []
    for piece in script:
        piece_ids = tok.encode(piece, add_special_tokens=False)
        assert len(piece_ids) == 1, (piece, piece_ids)
        pieces.append(piece_ids[0])
    chain = [last.pop(), *pieces, tok.convert_tokens_to_ids(END_OF_TURN)]
    assert len(set(chain)) == len(chain), "each token of the script must be unique"
    return chain


def _write_script(model: Any, chain: list[int]) -> None:
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden))  # orthonormal columns
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 0.02)
        head = model.lm_head.weight
        head.zero_()
        for i, token in enumerate(chain[:-1]):
            emb[token] = basis[:, i] * 0.5
            head[chain[i + 1]] = basis[:, i] * 20.0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
