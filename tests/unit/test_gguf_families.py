"""GGUF files of the qwen3moe, phi3, gemma2 and gemma3 architectures: a tiny random Hugging Face
checkpoint of each family is written to GGUF as llama.cpp's converter writes it
(tests/gguf_writer.py), and load_gguf must give back its config (the fields the model reads)
and every tensor; transformers, reading the same files, must find the same tensors (a check
that the writer follows llama.cpp's conventions as transformers understands them)."""
from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_writer import read_checkpoint, write_gguf
from pagoda.models.config import ModelArch
from pagoda.models.gguf_loader import GGUFError, load_gguf, load_gguf_tokenizer
from tiny_models import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 16; Phi-4-mini's 0.75 rotates 12 dims, 6 frequencies.
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
# case: (model_type, overrides). Gemma's query scale is head_dim (llama.cpp's rule for all but
# the 27B models) and Gemma 2 is tied (its converter drops lm_head): as the published models.
CASES = {
    "qwen3_moe": ("qwen3_moe", {}),
    "phi4-mini": ("phi3", dict(partial_rotary_factor=0.75, max_position_embeddings=512,
                               original_max_position_embeddings=32, rope_scaling=LONGROPE)),
    "phi3-4k": ("phi3", dict(sliding_window=16)),
    "gemma2": ("gemma2", dict(tie_word_embeddings=True, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(query_pre_attn_scalar=16, num_hidden_layers=6,
                                   sliding_window_pattern=6,
                                   rope_scaling={"rope_type": "linear", "factor": 8.0})),
}
GEMMA = ("gemma2", "gemma3_text")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[str, str, dict, dict[str, torch.Tensor]]:
    """(model_type, checkpoint directory, its config.json, its tensors)."""
    model_type, overrides = CASES[request.param]
    path = make_model(str(tmp_path_factory.mktemp(request.param)), model_type,
                      seed=list(CASES).index(request.param), **overrides)
    _, tensors = read_checkpoint(path)
    return model_type, path, json.load(open(os.path.join(path, "config.json"))), tensors


def is_gemma_norm(model_type: str, name: str) -> bool:
    return model_type in GEMMA and name.endswith("norm.weight")


@pytest.mark.parametrize("out_type", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_tensors_round_trip(case, out_type, tmp_path) -> None:
    model_type, hf_dir, _, hf = case
    write_gguf(hf_dir, str(tmp_path / "m.gguf"), out_type)
    got = load_gguf(str(tmp_path / "m.gguf")).tensors
    assert set(got) == set(hf)
    for name, want in hf.items():
        assert got[name].dtype == torch.float32 and got[name].shape == want.shape, name
        if is_gemma_norm(model_type, name):
            # Stored as fl(1 + w) in F32: the loader's fl(stored - 1) is exact (Sterbenz), so
            # w comes back to within half a float spacing at 1 + w.
            assert torch.equal(got[name], (want + 1) - 1), name
            torch.testing.assert_close(got[name], want, rtol=0, atol=2.0**-23, msg=name)
        elif out_type == Q.F32 or want.dim() == 1 or ".mlp.gate." in name:
            assert torch.equal(got[name], want), name  # F32 in the file: exact
        else:  # Q8_0 (F16 where rows do not fill 32-wide blocks): within one step of 127
            torch.testing.assert_close(got[name], want, rtol=0, atol=want.abs().max().item() / 127,
                                       msg=name)


def test_config_gives_the_same_model(case, tmp_path) -> None:
    """The GGUF's config describes the model transformers' config does (ModelArch, all it
    reads), and the HF keys a loader of the family reads carry the checkpoint's values."""
    model_type, hf_dir, hf_cfg, _ = case
    write_gguf(hf_dir, str(tmp_path / "m.gguf"))
    cfg = load_gguf(str(tmp_path / "m.gguf")).config
    assert cfg["model_type"] == model_type and cfg["architectures"] == hf_cfg["architectures"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == hf_cfg[key], key
    if model_type == "qwen3_moe":
        for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "head_dim"):
            assert cfg[key] == hf_cfg[key], key
        assert cfg["num_experts"] == hf_cfg["num_local_experts"]
    if model_type == "phi3":
        assert cfg["partial_rotary_factor"] == hf_cfg.get("partial_rotary_factor", 1.0)
        assert cfg["sliding_window"] == hf_cfg["sliding_window"]
    if model_type in GEMMA:
        assert_gemma_keys(cfg, hf_cfg)
    assert ModelArch.from_hf_config(cfg) == ModelArch.from_hf_config(hf_cfg)


def assert_gemma_keys(cfg: dict, hf_cfg: dict) -> None:
    for key in ("hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types",
                "attn_logit_softcapping", "final_logit_softcapping", "head_dim"):
        assert cfg[key] == hf_cfg[key], key
    rope = hf_cfg["rope_parameters"]
    full = rope.get("full_attention", rope)
    assert cfg["rope_theta"] == full["rope_theta"]
    if full.get("rope_type", "default") != "default":
        assert cfg["rope_scaling"] == {"rope_type": full["rope_type"], "factor": full["factor"]}
    else:
        assert cfg["rope_scaling"] is None
    if "sliding_attention" in rope:
        assert cfg["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]


def test_transformers_reads_the_same_tensors(case, tmp_path) -> None:
    """transformers' GGUF loader (which undoes llama.cpp's transforms its own way) finds the
    tensors pagoda finds in the written file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, hf_dir, _, _ = case
    write_gguf(hf_dir, str(tmp_path / "m.gguf"), Q.Q8_0)
    mine = load_gguf(str(tmp_path / "m.gguf")).tensors
    # transformers' GGUF config for qwen3moe lacks the experts' width: give it the real one.
    config = AutoConfig.from_pretrained(hf_dir) if model_type == "qwen3_moe" else None
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                 dtype=torch.float32, config=config)
    theirs = model.state_dict()
    if model_type == "qwen3_moe":  # transformers stacks the experts: stack ours alike
        mine = stack_experts(mine, model.config.num_hidden_layers, model.config.num_experts)
    assert set(mine) <= set(theirs)
    for name, w in mine.items():
        assert torch.equal(w, theirs[name]), name


def stack_experts(tensors: dict[str, torch.Tensor], layers: int, experts: int) -> dict[str, torch.Tensor]:
    """Per-expert matrices -> transformers' (experts, 2I, E) gate_up_proj and (experts, E, I)
    down_proj parameters."""
    def stack(layer: int, matrix: str) -> torch.Tensor:
        return torch.stack([tensors[f"model.layers.{layer}.mlp.experts.{e}.{matrix}.weight"]
                            for e in range(experts)])

    out = {n: t for n, t in tensors.items() if ".experts." not in n}
    for i in range(layers):
        gate_up = torch.cat([stack(i, "gate_proj"), stack(i, "up_proj")], dim=1)
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
        out[f"model.layers.{i}.mlp.experts.down_proj"] = stack(i, "down_proj")
    return out


# --------------------------------------------------------------------------- qwen3moe variants

@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("moe")), "qwen3_moe", seed=11)


def test_fused_gate_up_experts(moe_dir, tmp_path) -> None:
    """The converter's fused blk.N.ffn_gate_up_exps gives the same per-expert tensors."""
    write_gguf(moe_dir, str(tmp_path / "split.gguf"))
    write_gguf(moe_dir, str(tmp_path / "fused.gguf"), fuse_experts=True)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "fused.gguf")).tensors}
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_up_exps.weight" not in names
    split, fused = load_gguf(str(tmp_path / "split.gguf")), load_gguf(str(tmp_path / "fused.gguf"))
    assert split.config == fused.config and set(split.tensors) == set(fused.tensors)
    for name, w in split.tensors.items():
        assert torch.equal(w, fused.tensors[name]), name


def test_experts_in_bfloat16(moe_dir, tmp_path) -> None:
    write_gguf(moe_dir, str(tmp_path / "m.gguf"))
    path = str(tmp_path / "m.gguf")
    full, half = load_gguf(path).tensors, load_gguf(path, torch.bfloat16).tensors
    assert set(full) == set(half)
    for name, w in half.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, full[name].to(torch.bfloat16)), name


# --------------------------------------------------------------------------- metadata rules

def write_metadata_only(path: str, arch: str, keys: dict, layers: int, hidden: int, heads: int,
                        head_dim: int, tokens: dict[str, int] | None = None) -> None:
    """A GGUF with an architecture's metadata and no tensors (the config comes from keys)."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in (tokens or {}).items():
        w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(heads // 2)
    w.add_key_length(head_dim)
    w.add_vocab_size(256)
    for key, value in keys.items():
        w.add_key_value(f"{arch}.{key}", *value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


U32, F32, ARR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize(("arch", "layers", "hidden", "heads", "head_dim", "scalar"), [
    ("gemma2", 26, 2304, 8, 256, 256),   # Gemma 2 2B: head_dim
    ("gemma2", 46, 4608, 32, 128, 144),  # Gemma 2 27B: hidden / heads
    ("gemma3", 34, 2560, 8, 256, 256),   # Gemma 3 4B
    ("gemma3", 62, 5376, 32, 128, 168),  # Gemma 3 27B
])
def test_gemma_query_scale_as_llama_cpp(tmp_path, arch, layers, hidden, heads, head_dim, scalar) -> None:
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) in the
    27B models (known by their layer count): the published query_pre_attn_scalar values."""
    path = str(tmp_path / "g.gguf")
    write_metadata_only(path, arch, {"attention.sliding_window": (4096, U32)}, layers, hidden, heads,
                        head_dim)
    cfg = load_gguf(path).config
    assert cfg["query_pre_attn_scalar"] == scalar and cfg["head_dim"] == head_dim
    period = 2 if arch == "gemma2" else 6
    assert cfg["layer_types"] == ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                                  for i in range(layers)]
    if arch == "gemma3":  # llama.cpp's fixed local base where the file gives none
        assert cfg["rope_local_base_freq"] == 10000.0 and cfg["rope_theta"] == 1_000_000.0


def test_gemma_explicit_scale_and_pattern(tmp_path) -> None:
    """attention.scale and a per-layer sliding_window_pattern, where a file has them, win."""
    path = str(tmp_path / "g.gguf")
    keys = {"attention.scale": (0.125, F32), "attention.sliding_window": (512, U32),
            "attention.sliding_window_pattern": ([True, False, True, True], ARR, gguf.GGUFValueType.BOOL),
            "rope.freq_base_swa": (20000.0, F32)}
    write_metadata_only(path, "gemma3", keys, 4, 64, 4, 16)
    cfg = load_gguf(path).config
    assert cfg["query_pre_attn_scalar"] == 64.0 and cfg["sliding_window"] == 512
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert cfg["rope_local_base_freq"] == 20000.0


def test_end_of_turn_stops_generation(tmp_path) -> None:
    """A file naming an end-of-turn token (Gemma's <end_of_turn>, 107) lists it beside EOS, as
    the HF config does and as llama.cpp stops at it; one id stays an int."""
    path = str(tmp_path / "g.gguf")
    write_metadata_only(path, "gemma2", {}, 2, 64, 4, 16,
                        tokens={"eos_token_id": 1, "eot_token_id": 107})
    assert load_gguf(path).config["eos_token_id"] == [1, 107]
    write_metadata_only(path, "gemma2", {}, 2, 64, 4, 16, tokens={"eos_token_id": 1, "eot_token_id": 1})
    assert load_gguf(path).config["eos_token_id"] == 1


def test_gemma3_without_window_has_no_sliding_layers(tmp_path) -> None:
    """The converter writes no window where every layer is global (sliding_window_pattern 1)."""
    path = str(tmp_path / "g.gguf")
    write_metadata_only(path, "gemma3", {}, 6, 64, 4, 16)
    cfg = load_gguf(path).config
    assert cfg["sliding_window"] is None and set(cfg["layer_types"]) == {"full_attention"}


def test_phi3_attention_factor_kept_when_not_the_default(tmp_path) -> None:
    path = str(tmp_path / "p.gguf")
    w = gguf.GGUFWriter(path, "phi3")
    for key, value in {"block_count": 1, "embedding_length": 64, "feed_forward_length": 96,
                       "attention.head_count": 4, "context_length": 512,
                       "rope.dimension_count": 16, "rope.scaling.original_context_length": 32}.items():
        w.add_uint32(f"phi3.{key}", value)
    w.add_float32("phi3.rope.scaling.attn_factor", 1.5)
    w.add_vocab_size(8)
    w.add_tensor("rope_factors_long.weight", np.full(8, 4.0, np.float32))
    w.add_tensor("rope_factors_short.weight", np.full(8, 1.25, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    scaling = load_gguf(path).config["rope_scaling"]
    assert scaling == {"rope_type": "longrope", "short_factor": [1.25] * 8, "long_factor": [4.0] * 8,
                       "original_max_position_embeddings": 32, "attention_factor": 1.5}


# --------------------------------------------------------------------------- refusals

def write_with(path: str, arch: str, keys: dict, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(path, arch)
    for key, value in {"block_count": 1, "embedding_length": 64, "feed_forward_length": 96,
                       "attention.head_count": 4, "vocab_size": 8}.items():
        w.add_uint32(f"{arch}.{key}", value)
    for key, value in keys.items():
        w.add_key_value(f"{arch}.{key}", *value)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MOE_KEYS = {"expert_count": (4, U32), "expert_used_count": (2, U32),
            "expert_feed_forward_length": (32, U32)}


@pytest.mark.parametrize(("arch", "keys", "tensors", "message"), [
    ("qwen2moe", {}, {},
     r"'qwen2moe'.*supported: \['gemma2', 'gemma3', 'llama', 'phi3', 'qwen2', 'qwen3', 'qwen3moe'\]"),
    ("phimoe", {}, {}, "unsupported GGUF architecture 'phimoe'"),
    ("gemma", {}, {}, "unsupported GGUF architecture 'gemma'"),
    ("qwen3moe", {**MOE_KEYS, "expert_shared_count": (1, U32)}, {}, "shared experts"),
    ("qwen3moe", {**MOE_KEYS, "expert_gating_func": (2, U32)}, {}, "gating function 2"),
    ("qwen3moe", {"expert_used_count": (2, U32), "expert_feed_forward_length": (32, U32)}, {},
     "qwen3moe.expert_count"),
    ("qwen3moe", MOE_KEYS, {"blk.0.ffn_gate_shexp.weight": np.zeros((32, 64), np.float32)},
     "unknown GGUF tensor 'blk.0.ffn_gate_shexp.weight' for architecture 'qwen3moe'"),
    ("qwen3", {}, {"blk.0.ffn_up_exps.weight": np.zeros((4, 32, 64), np.float32)},
     "'blk.0.ffn_up_exps.weight' for architecture 'qwen3'"),
    ("gemma2", {}, {"blk.0.attn_qkv.weight": np.zeros((192, 64), np.float32)},
     "'blk.0.attn_qkv.weight' for architecture 'gemma2'"),
    ("phi3", {"rope.scaling.original_context_length": (32, U32)},
     {"rope_factors_long.weight": np.ones(8, np.float32)}, "LongRoPE needs"),
])
def test_unsupported_is_refused_by_name(tmp_path, arch, keys, tensors, message) -> None:
    path = str(tmp_path / "x.gguf")
    write_with(path, arch, keys, tensors)
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


# --------------------------------------------------------------------------- SentencePiece vocab

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "ll", "llo", "or", "ld", "he", "▁he",
          "▁hello", "▁wor", "▁world"]


def write_spm_vocab(path: str, arch: str) -> list[str]:
    """A Gemma-style SentencePiece vocabulary as the converter writes it: tokenizer.ggml.model
    "llama", scores, token types (control, unknown, 256 byte tokens, normal), no prefix space."""
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(PIECES))])
    w.add_token_types([3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(PIECES))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}"
                        "<end_of_turn>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_sentencepiece_vocabulary(tmp_path, arch) -> None:
    """Gemma's SentencePiece vocabulary goes to transformers' GGUF SentencePiece converter (not
    the byte-level BPE path): ▁ word pieces, BOS first, control tokens whole, byte fallback."""
    path = str(tmp_path / "spm.gguf")
    tokens = write_spm_vocab(path, arch)
    tok = load_gguf_tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.convert_ids_to_tokens(tok(" hello world").input_ids) == ["<bos>", "▁hello", "▁world"]
    ids = tok("<start_of_turn> hello<end_of_turn>").input_ids
    assert [tokens[i] for i in ids] == ["<bos>", "<start_of_turn>", "▁hello", "<end_of_turn>"]
    ids = tok("é").input_ids  # no piece for é: its UTF-8 bytes
    assert [tokens[i] for i in ids] == ["<bos>", "<0xC3>", "<0xA9>"]
    for text in ("hello world", " hello world", "héllo wörld"):
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<bos><start_of_turn>hi<end_of_turn>"
