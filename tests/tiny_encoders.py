"""Tiny random encoder checkpoints (BERT, RoBERTa, XLM-RoBERTa) with their tokenizers, saved as
transformers and Sentence Transformers save them, made by the tests themselves; and packing
tokenized texts the way pagoda's encoders take them."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

ENCODER_VOCAB = 320
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "paged attention keeps the kv cache in fixed size blocks",
    "continuous batching schedules every iteration and chunked prefill slices long prompts",
    "an embedding model maps a text to one vector and a reranker scores a query with a passage",
    "numbers 0123456789 and punctuation , . ; : ! ?",
] * 10

# Texts of mixed lengths, packed together in one batch by the tests.
TEXTS = [
    "the fox",
    "paged attention keeps the kv cache in fixed size blocks and continuous batching "
    "schedules every iteration",
    "a reranker scores",
    "numbers 0123456789 , the lazy dog jumps over the quick brown fox ; chunked prefill",
    "embedding model maps a text to one vector",
]
QUERY = "which model scores a query with a passage"


def _bert_tokenizer(path: str) -> Any:
    from transformers import BertTokenizerFast

    words = sorted({w for line in CORPUS for w in line.split()})
    chars = sorted({c for line in CORPUS for c in line if c != " "})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)
    tok.save_pretrained(path)
    return tok


def _roberta_tokenizer(path: str) -> Any:
    """A byte-level BPE with RoBERTa's specials (<s> 0, <pad> 1, </s> 2) and post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=ENCODER_VOCAB - 16,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    fast.save_pretrained(path)
    return fast


FAMILIES = ("bert", "roberta", "xlm-roberta")


def make_encoder(
    path: str, family: str = "bert", num_labels: int = 0, seed: int = 0, **overrides: Any
) -> str:
    """Save a tiny random ``family`` encoder and its tokenizer to ``path``: ``*Model`` when
    ``num_labels`` is 0, else ``*ForSequenceClassification`` with that many labels."""
    import transformers

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        vocab_size=ENCODER_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if family == "bert":
        common.update(max_position_embeddings=128, pad_token_id=0)
        config_cls, prefix = transformers.BertConfig, "Bert"
    else:  # positions from pad_token_id + 1 = 2
        common.update(
            max_position_embeddings=130,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            type_vocab_size=1,
        )
        config_cls, prefix = (
            (transformers.RobertaConfig, "Roberta")
            if family == "roberta"
            else (transformers.XLMRobertaConfig, "XLMRoberta")
        )
    if num_labels:
        common["num_labels"] = num_labels
    common.update(overrides)
    model_cls = getattr(
        transformers, prefix + ("ForSequenceClassification" if num_labels else "Model")
    )
    model = model_cls(config_cls(**common)).eval()
    # Weights larger than init's: vectors far from flat. A tiny random encoder's first rows
    # differ little from one sequence to the next, so the classifier's last projection is
    # larger still: scores spread over (0, 1), ranks far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                last = name.startswith("classifier") and ".dense." not in name
                p.normal_(0.0, 1.0 if last else 0.1)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    (_bert_tokenizer if family == "bert" else _roberta_tokenizer)(path)
    return path


def make_sentence_transformer(path: str, family: str, pooling: str, normalize: bool) -> Any:
    """A Sentence Transformers model over a tiny ``family`` encoder, with a Pooling module of
    ``pooling`` ("mean", "cls", "lasttoken") and a Normalize module when ``normalize``, saved
    to ``path`` as the library saves it. Returns the SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = make_encoder(path + "-base", family)
    transformer = Transformer(base)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    st = SentenceTransformer(modules=modules, device="cpu")
    st.save(path)
    return st


def pack(encodings: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
    """Tokenized sequences (a tokenizer's outputs, one dict each) packed one after the other:
    input_ids, positions, token_type_ids (T,) and seq_lens."""
    ids = [torch.tensor(e["input_ids"]) for e in encodings]
    types = [torch.tensor(e.get("token_type_ids") or [0] * len(e["input_ids"])) for e in encodings]
    return dict(
        input_ids=torch.cat(ids),
        positions=torch.cat([torch.arange(len(i)) for i in ids]),
        token_type_ids=torch.cat(types),
        seq_lens=[len(i) for i in ids],
    )


def pagoda_hidden(loaded: Any, texts: Sequence[Any], pairs: Optional[bool] = False) -> Any:
    """pagoda's packed hidden states (T, E) for ``texts`` (or (query, doc) pairs), and the
    packed batch."""
    tok = loaded.tokenizer
    encodings = [tok(*t) if pairs else tok(t) for t in texts]
    batch = pack(encodings)
    with torch.no_grad():
        hidden = loaded.model(
            batch["input_ids"], batch["positions"], batch["seq_lens"], batch["token_type_ids"]
        )
    return hidden, batch
