"""The pooling routes on ``pagoda serve --runner pooling``, through the official clients against
tiny random checkpoints the tests write, checked against sentence-transformers and
transformers on the same files: OpenAI's ``/v1/embeddings`` (``openai`` client, float and
base64, texts and token ids as LangChain sends them, LangChain's ``OpenAIEmbeddings``),
``/v1/rerank`` / ``/rerank`` and ``/score`` on a cross-encoder and on an embedding model,
``/classify``, Ollama's ``/api/embed`` and ``/api/embeddings`` (``ollama`` client), and a
table of bad input (4xx naming the field, the server serving on)."""
from __future__ import annotations

import base64
import struct
from typing import Iterator

import httpx
import pytest
import torch
from server_utils import ServerProcess, start_server
from tiny_encoders import QUERY, TEXTS, make_encoder, make_sentence_transformer

POOLING = ("--runner", "pooling", "--max-model-len", "128", "--enable-debug-endpoints")


def _serve(path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(path, tmp_path_factory.mktemp("logs"), *POOLING)
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


@pytest.fixture(scope="module")
def st_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("st") / "bert-mean")
    make_sentence_transformer(path, "bert", "mean", normalize=True)
    return path


@pytest.fixture(scope="module")
def embedder(st_path: str, tmp_path_factory) -> Iterator[ServerProcess]:
    yield from _serve(st_path, tmp_path_factory)


@pytest.fixture(scope="module")
def reference(st_path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(st_path, device="cpu")


@pytest.fixture(scope="module")
def cross_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_encoder(str(tmp_path_factory.mktemp("cross") / "bert-cross"), "bert", 1)


@pytest.fixture(scope="module")
def cross(cross_path: str, tmp_path_factory) -> Iterator[ServerProcess]:
    yield from _serve(cross_path, tmp_path_factory)


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("cls") / "roberta-cls")
    return make_encoder(path, "roberta", 3, id2label={0: "neg", 1: "neu", 2: "pos"},
                        label2id={"neg": 0, "neu": 1, "pos": 2})


@pytest.fixture(scope="module")
def classifier(classifier_path: str, tmp_path_factory) -> Iterator[ServerProcess]:
    yield from _serve(classifier_path, tmp_path_factory)


def _model(server: ServerProcess) -> str:
    return httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


def _assert_serving(server: ServerProcess) -> None:
    state = httpx.get(server.url + "/debug/state", timeout=30).json()
    assert state["invariants_ok"] and state["num_unfinished"] == 0, state


# ---------------------------------------------------------------- embeddings
def test_openai_client_float_and_base64_match_sentence_transformers(embedder, reference):
    from openai import OpenAI

    want = reference.encode(TEXTS, convert_to_tensor=True)
    with OpenAI(base_url=embedder.url + "/v1", api_key="x", max_retries=0) as client:
        model = _model(embedder)
        floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
        # The client asks for base64 when no format is given, and decodes it itself.
        decoded = client.embeddings.create(model=model, input=TEXTS)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    for i, (f, b) in enumerate(zip(floats.data, decoded.data, strict=True)):
        assert _cos(f.embedding, want[i].tolist()) >= 0.99999
        assert b.embedding == pytest.approx(f.embedding, abs=1e-7)  # the same float32 values
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert floats.usage.prompt_tokens == tokens == floats.usage.total_tokens


def test_base64_is_little_endian_float32(embedder):
    model = _model(embedder)
    body = {"model": model, "input": TEXTS[0]}
    f = httpx.post(embedder.url + "/v1/embeddings", json=body, timeout=60).json()
    b = httpx.post(embedder.url + "/v1/embeddings", json={**body, "encoding_format": "base64"},
                   timeout=60).json()
    raw = base64.b64decode(b["data"][0]["embedding"])
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(values) == pytest.approx(f["data"][0]["embedding"], abs=0)


def test_token_ids_in_batches_as_langchain_sends_them(embedder, reference):
    """LangChain's OpenAIEmbeddings sends lists of token ids by default (tokenized with
    tiktoken, which needs a download this machine cannot make); the same request shape."""
    ids = [reference.tokenizer(t)["input_ids"] for t in TEXTS]
    model = _model(embedder)
    by_ids = httpx.post(embedder.url + "/v1/embeddings", json={"model": model, "input": ids},
                        timeout=60).json()
    by_text = httpx.post(embedder.url + "/v1/embeddings", json={"model": model, "input": TEXTS},
                         timeout=60).json()
    for a, b in zip(by_ids["data"], by_text["data"], strict=True):
        assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-6)
    single = httpx.post(embedder.url + "/v1/embeddings", json={"model": model, "input": ids[1]},
                        timeout=60).json()
    assert single["data"][0]["embedding"] == pytest.approx(by_text["data"][1]["embedding"],
                                                           abs=1e-6)


def test_langchain_openai_embeddings(embedder, reference):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=_model(embedder), base_url=embedder.url + "/v1", api_key="x",
                           check_embedding_ctx_length=False, chunk_size=2)
    got = emb.embed_documents(TEXTS)
    want = reference.encode(TEXTS)
    assert len(got) == len(TEXTS)
    for g, w in zip(got, want, strict=True):
        assert _cos(g, w.tolist()) >= 0.99999
    assert _cos(emb.embed_query(QUERY), reference.encode(QUERY).tolist()) >= 0.99999


def test_ollama_embed_and_embeddings(embedder, reference):
    import ollama

    oc = ollama.Client(host=embedder.url, timeout=60)
    model = _model(embedder)
    got = oc.embed(model=model, input=TEXTS[:3]).embeddings
    want = reference.encode(TEXTS[:3], normalize_embeddings=True)
    for g, w in zip(got, want, strict=True):
        assert _cos(g, w.tolist()) >= 0.99999
        assert sum(x * x for x in g) == pytest.approx(1.0, abs=1e-5)  # normalized, as Ollama
    one = oc.embeddings(model=model, prompt=TEXTS[0]).embedding
    assert _cos(one, want[0].tolist()) >= 0.99999


def test_rerank_and_score_on_an_embedding_model_are_cosines(embedder, reference):
    model = _model(embedder)
    r = httpx.post(embedder.url + "/v1/rerank", timeout=60,
                   json={"model": model, "query": QUERY, "documents": TEXTS}).json()
    q = reference.encode(QUERY, convert_to_tensor=True)
    docs = reference.encode(TEXTS, convert_to_tensor=True)
    want = [float(torch.nn.functional.cosine_similarity(q, d, dim=0)) for d in docs]
    got = {res["index"]: res["relevance_score"] for res in r["results"]}
    assert [got[i] for i in range(len(TEXTS))] == pytest.approx(want, abs=1e-5)
    s = httpx.post(embedder.url + "/score", timeout=60,
                   json={"model": model, "text_1": QUERY, "text_2": TEXTS}).json()
    assert [d["score"] for d in s["data"]] == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------- cross-encoder
def test_rerank_matches_cross_encoder(cross, cross_path):
    from sentence_transformers import CrossEncoder

    want = CrossEncoder(cross_path, device="cpu").predict([(QUERY, t) for t in TEXTS])
    model = _model(cross)
    for path in ("/v1/rerank", "/rerank"):
        r = httpx.post(cross.url + path, timeout=60,
                       json={"model": model, "query": QUERY, "documents": TEXTS}).json()
        results = r["results"]
        assert [res["index"] for res in results] == sorted(range(len(TEXTS)),
                                                           key=lambda i: -want[i])
        for res in results:
            assert res["relevance_score"] == pytest.approx(float(want[res["index"]]), abs=1e-4)
            assert res["document"]["text"] == TEXTS[res["index"]]
        assert r["usage"]["total_tokens"] > 0
    top = httpx.post(cross.url + "/v1/rerank", timeout=60, json={
        "model": model, "query": QUERY, "documents": [{"text": t} for t in TEXTS], "top_n": 2,
        "return_documents": False}).json()["results"]
    assert [res["index"] for res in top] == [res["index"] for res in results][:2]
    assert all("document" not in res for res in top)


def test_score_one_to_one_and_one_to_many(cross, cross_path):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(cross_path, device="cpu")
    model = _model(cross)
    many = httpx.post(cross.url + "/score", timeout=60,
                      json={"model": model, "text_1": QUERY, "text_2": TEXTS}).json()
    assert [d["score"] for d in many["data"]] == pytest.approx(
        ce.predict([(QUERY, t) for t in TEXTS]).tolist(), abs=1e-4)
    firsts = TEXTS[:3]
    seconds = list(reversed(TEXTS[:3]))
    one = httpx.post(cross.url + "/v1/score", timeout=60,
                     json={"model": model, "text_1": firsts, "text_2": seconds}).json()
    assert [d["score"] for d in one["data"]] == pytest.approx(
        ce.predict(list(zip(firsts, seconds, strict=True))).tolist(), abs=1e-4)
    bad = httpx.post(cross.url + "/score", timeout=60,
                     json={"model": model, "text_1": TEXTS[:2], "text_2": TEXTS[:3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
    _assert_serving(cross)


# ---------------------------------------------------------------- classify
def test_classify_matches_transformers(classifier, classifier_path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(classifier_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_path).eval()
    with torch.no_grad():
        want = [torch.softmax(hf(**tok(t, return_tensors="pt")).logits[0], -1) for t in TEXTS]
    r = httpx.post(classifier.url + "/classify", timeout=60,
                   json={"model": _model(classifier), "input": TEXTS}).json()
    for d, w in zip(r["data"], want, strict=True):
        assert d["probs"] == pytest.approx(w.tolist(), abs=1e-4)
        assert d["num_classes"] == 3
        assert d["label"] == ["neg", "neu", "pos"][int(w.argmax())]


# ---------------------------------------------------------------- bad input
LONG = "the quick brown fox " * 60  # more tokens than --max-model-len 128

BAD = [
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ""}, "input[0]"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input[1]"),
    ("/v1/embeddings", {"input": [[]]}, "input[0]"),
    ("/v1/embeddings", {"input": ["x"] * 2049}, "input"),
    ("/v1/embeddings", {"input": LONG}, "input"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 100000}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/score", {"text_1": [], "text_2": ["a"]}, "text_1"),
    ("/classify", {"input": "x"}, "model"),  # an embedding model has no classifier
    ("/v1/completions", {"prompt": "x"}, "model"),  # nor text generation
]


@pytest.mark.parametrize(("path", "body", "param"), BAD, ids=[f"{p}-{n}" for p, _, n in BAD])
def test_bad_input_is_a_400_naming_the_field(embedder, path, body, param):
    r = httpx.post(embedder.url + path, json={"model": _model(embedder), **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    ok = httpx.post(embedder.url + "/v1/embeddings", timeout=60,
                    json={"model": _model(embedder), "input": "still serving"})
    assert ok.status_code == 200
    _assert_serving(embedder)


def test_truncation_keeps_the_last_tokens(embedder):
    model = _model(embedder)
    r = httpx.post(embedder.url + "/v1/embeddings", timeout=60,
                   json={"model": model, "input": LONG, "truncate_prompt_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 16
