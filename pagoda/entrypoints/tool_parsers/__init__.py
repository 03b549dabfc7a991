"""The tool-call formats ``--tool-call-parser`` chooses from (vLLM's names), one entry each.

A format reads a model's answer into content and calls (``base.py`` says how, and the
invariant every format keeps: what a stream sends of a live answer is never taken back);
``json_calls.py``, ``python_calls.py`` and ``xml_calls.py`` hold the readers. Adding a format
is a reader and one line here.
"""

from __future__ import annotations

from pagoda.entrypoints.tool_parsers.base import (
    Call,
    Output,
    Parsed,
    Schemas,
    ToolFormat,
    mistral_id,
    openai_id,
)
from pagoda.entrypoints.tool_parsers.json_calls import (
    read_hermes,
    read_llama3,
    read_mistral,
    read_phi4_mini,
    read_required,
)
from pagoda.entrypoints.tool_parsers.python_calls import read_gemma, read_pythonic
from pagoda.entrypoints.tool_parsers.xml_calls import read_qwen3_coder

FORMATS: dict[str, ToolFormat] = {
    # <tool_call>{json}</tool_call>: Hermes 2/3, Qwen2.5, Qwen3 (special tokens in Hermes 2 Pro)
    "hermes": ToolFormat(read_hermes, keeps_special_tokens=True),
    # {"name", "parameters"} objects opening the answer: Llama 3.1-3.3 (<|python_tag|>)
    "llama3_json": ToolFormat(read_llama3),
    # [f(x=1), g()]: Llama 3.2, Llama 4 (<|python_start|>), Gemma 3 as Google prompts it
    "pythonic": ToolFormat(read_pythonic),
    # [TOOL_CALLS][{json}...] or [TOOL_CALLS]name[ARGS]{json}: Mistral, Mixtral, Devstral
    "mistral": ToolFormat(read_mistral, keeps_special_tokens=True, new_id=mistral_id),
    # <tool_call><function=f><parameter=k>v</parameter></function></tool_call>: Qwen3-Coder
    "qwen3_coder": ToolFormat(read_qwen3_coder),
    # functools[{json}, ...]: Phi-4-mini
    "phi4_mini_json": ToolFormat(read_phi4_mini),
    # ```tool_code fences of Python calls: Gemma 2 and 3 as Google's agent guides prompt them
    "gemma": ToolFormat(read_gemma),
}

# tool_choice "required": the JSON list of {"name", "parameters"} its grammar makes.
REQUIRED = ToolFormat(read_required)


def get_format(name: str) -> ToolFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {', '.join(FORMATS)}")
    return FORMATS[name]


__all__ = ["FORMATS", "REQUIRED", "Call", "Output", "Parsed", "Schemas", "ToolFormat",
           "get_format", "openai_id"]  # fmt: skip
