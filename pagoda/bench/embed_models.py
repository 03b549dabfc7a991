"""Checkpoints and texts for ``pagoda bench embed``, made offline: a word-level tokenizer (one
word, one token, so a text's token count is chosen exactly), random weights of a preset's
shapes, saved as Sentence Transformers saves a model (Transformer + Pooling (+ Normalize)), or
as a cross-encoder (``*ForSequenceClassification``, one label).

Invariant: both engines read the same directory: the same weights, tokenizer and pooling
config; a text of ``n`` words tokenizes to ``n`` + the template's special tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

WORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_WORD_LETTERS = 4  # 26 + 26^2 + 26^3 + 26^4 words: more than any preset's vocab
CLASSIFIER_LOGIT_STD = 3.0  # scores spread over (0, 1), ranks far from ties


@dataclass(frozen=True)
class EmbedPreset:
    """A model shape and how it pools: an encoder (BERT) or a decoder embedder (Qwen3)."""

    config: dict[str, Any]
    pooling: str  # Sentence Transformers' pooling_mode: "mean", "cls", "lasttoken"
    normalize: bool
    specials: dict[str, int]  # token -> id
    single: tuple[str, ...]  # the template of one text: special tokens around "$A"
    pair: tuple[str, ...]  # of a (query, document) pair: "$A", "$B" and specials
    default_num_texts: int

    @property
    def is_decoder(self) -> bool:
        return self.config["model_type"] not in ("bert", "roberta", "xlm-roberta")


_BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def _bert_config(**shape: Any) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **shape,
    }


def _bert_preset(num_texts: int, **shape: Any) -> EmbedPreset:
    """Mean pooled and normalized, as all-MiniLM-L12 / bge-small are."""
    return EmbedPreset(
        _bert_config(**shape),
        "mean",
        True,
        _BERT_SPECIALS,
        ("[CLS]", "$A", "[SEP]"),
        ("[CLS]", "$A", "[SEP]", "$B", "[SEP]"),
        num_texts,
    )


def _qwen3_preset(num_texts: int, **shape: Any) -> EmbedPreset:
    """Last-token pooled and normalized, an end-of-text token appended: Qwen3-Embedding."""
    from pagoda.models.presets import PRESETS

    config = {**PRESETS["qwen3-0.6b"], "architectures": ["Qwen3Model"], **shape}
    config.update(pad_token_id=151643, eos_token_id=151643)
    return EmbedPreset(
        config,
        "lasttoken",
        True,
        _QWEN_SPECIALS,
        ("$A", "<|endoftext|>"),
        ("$A", "$B", "<|endoftext|>"),
        num_texts,
    )


# bge-small / all-MiniLM-L12 shapes; Qwen3-0.6B's (Qwen3-Embedding-0.6B). The tiny-* ones are
# the test's: the same families, seconds to build and run.
PRESETS: dict[str, EmbedPreset] = {
    "bert-small": _bert_preset(
        2000, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=1536,
    ),
    "qwen3-0.6b": _qwen3_preset(16),
    "tiny-bert": _bert_preset(
        12, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=64,
    ),
    "tiny-qwen3": _qwen3_preset(
        12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, vocab_size=151936,
    ),
}  # fmt: skip


def word(i: int) -> str:
    """The ``i``-th word: a, b, ..., z, aa, ab, ... (bijective base 26)."""
    letters = []
    i += 1
    while i > 0:
        i, r = divmod(i - 1, len(WORD_LETTERS))
        letters.append(WORD_LETTERS[r])
    return "".join(reversed(letters))


def word_vocab(vocab_size: int, specials: dict[str, int]) -> dict[str, int]:
    """Every id below ``vocab_size``: the specials at their ids, words at the others."""
    taken = set(specials.values())
    words = (word(i) for i in range(vocab_size))
    vocab = dict(specials)
    for token_id in range(vocab_size):
        if token_id not in taken:
            vocab[next(words)] = token_id
    return vocab


def save_word_tokenizer(path: str, preset: EmbedPreset) -> Any:
    """A word-level fast tokenizer over the preset's vocab and templates, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = word_vocab(preset.config["vocab_size"], preset.specials)
    unk = "[UNK]" if "[UNK]" in vocab else "<|endoftext|>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    used = sorted({t for t in preset.single + preset.pair if not t.startswith("$")})
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(preset.single),
        pair=" ".join(_typed_pair(preset.pair)),
        special_tokens=[(t, vocab[t]) for t in used],
    )
    names = (
        dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
        if not preset.is_decoder
        else dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    )
    inputs = ["input_ids", "attention_mask"]
    if not preset.is_decoder:
        inputs.insert(1, "token_type_ids")  # BERT's segments of a (query, document) pair
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, model_input_names=inputs, **names
    )
    fast.model_max_length = preset.config["max_position_embeddings"]
    fast.save_pretrained(path)
    return fast


def _typed_pair(template: tuple[str, ...]) -> list[str]:
    """The pair template with BERT's segment ids: type 1 from "$B" on."""
    out, second = [], False
    for t in template:
        second = second or t == "$B"
        out.append(f"{t}:1" if second else t)
    return out


def num_special_tokens(preset: EmbedPreset, pair: bool = False) -> int:
    return sum(not t.startswith("$") for t in (preset.pair if pair else preset.single))


# ---------------------------------------------------------------------------------- weights
def random_model(preset: EmbedPreset, num_labels: int, dtype: torch.dtype, seed: int) -> Any:
    """transformers' model of the preset's shapes, random weights scaled so that vectors and
    scores differ from text to text (a check that passes on flat vectors checks nothing)."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(preset.config)
    model_type = cfg.pop("model_type")
    if num_labels:
        cfg["architectures"] = ["BertForSequenceClassification"]
        cfg["num_labels"] = num_labels
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    auto = transformers.AutoModelForSequenceClassification if num_labels else transformers.AutoModel
    model = auto.from_config(config)
    if not preset.is_decoder:
        _scale_encoder(model, config.hidden_size)
    return model.to(dtype).eval()


def _scale_encoder(model: Any, hidden: int) -> None:
    """Matrices at 1/sqrt(fan-in) (activations keep their scale through the layers, so the
    pooled vectors depend on the words), the classifier at ``CLASSIFIER_LOGIT_STD``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "embeddings" in name:
                continue
            std = 1.0 / math.sqrt(p.shape[1])
            if name.startswith("classifier"):
                std *= CLASSIFIER_LOGIT_STD
            p.normal_(0.0, std)


def save_sentence_transformer(path: str, preset: EmbedPreset, dtype: torch.dtype, seed: int) -> str:
    """An embedding model at ``path``: the checkpoint, the tokenizer and Sentence
    Transformers' modules (Transformer, Pooling, Normalize), which pagoda reads too."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = path + "-base"
    random_model(preset, 0, dtype, seed).save_pretrained(base)
    save_word_tokenizer(base, preset)
    transformer = Transformer(base, model_kwargs={"dtype": dtype})
    modules: list[Any] = [
        transformer,
        Pooling(transformer.get_embedding_dimension(), pooling_mode=preset.pooling),
    ]
    if preset.normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(path)
    _remove_tree(base)
    return path


def save_cross_encoder(path: str, preset: EmbedPreset, dtype: torch.dtype, seed: int) -> str:
    """A cross-encoder at ``path``: ``BertForSequenceClassification``, one label."""
    if preset.is_decoder:
        raise ValueError("--task rerank builds a BERT cross-encoder: use --model-preset bert-small")
    random_model(preset, 1, dtype, seed).save_pretrained(path)
    save_word_tokenizer(path, preset)
    return path


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ texts
def token_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """``n`` token counts uniform in [lo, hi], fixed by ``seed``."""
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def word_texts(
    vocab_size: int, specials: dict[str, int], num_words: list[int], seed: int
) -> list[str]:
    """Texts of exactly ``num_words[i]`` words each, drawn uniformly from the vocab's words."""
    rng = random.Random(seed)
    num_word_ids = vocab_size - len(specials)
    return [" ".join(word(rng.randrange(num_word_ids)) for _ in range(n)) for n in num_words]


def preset_texts(
    preset: EmbedPreset, lengths: list[int], seed: int, pair_with: Optional[int] = None
) -> list[str]:
    """Texts whose token counts (the template's specials included) are ``lengths``; with
    ``pair_with`` (a query's word count) the count is of the (query, text) pair."""
    if pair_with is None:
        extra = num_special_tokens(preset)
    else:
        extra = num_special_tokens(preset, pair=True) + pair_with
    words = [n - extra for n in lengths]
    if min(words) < 1:
        raise ValueError(f"texts need at least {extra + 1} tokens, got {min(lengths)}")
    return word_texts(preset.config["vocab_size"], preset.specials, words, seed)
