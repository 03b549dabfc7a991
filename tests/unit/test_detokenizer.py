"""IncrementalDetokenizer: token-by-token text equals a full decode, and stop strings."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagoda.engine.detokenizer import IncrementalDetokenizer
from tiny_models import make_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, naïve café",
    "emoji 😀🎉 and flags 🇫🇷 and a family 👨‍👩‍👧!",
    "中文字符 日本語のテキスト 한국어",
    "mixed: a😀b世c\u0301d — “quotes” … ∑∫√",
    "def f(x):\n    return x * 2  # numbers 0123456789\n\t tabs  and  spaces ",
    "😀",
    " leading and trailing spaces  ",
]


class WindowOnly:
    """A tokenizer with its Rust backend hidden: the detokenizer's generic windowed path,
    as a slow (Python) tokenizer would take it."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)


# Each tokenizer runs through both paths: the Rust stream decoder and the window.
PATHS = ["stream", "window"]


def _path(tok, path: str):
    if path == "window":
        tok = WindowOnly(tok)
        assert IncrementalDetokenizer(tok, [], [], False, True)._stream is None
    else:
        assert IncrementalDetokenizer(tok, [], [], False, True)._stream is not None
    return tok


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module", params=PATHS)
def tiny_tok(tiny_raw, request):
    return _path(tiny_raw, request.param)


@pytest.fixture(scope="module")
def gguf_raw():
    # The bundled model is installed by the set-up: missing, it is a broken install (a
    # failure here), not a reason to test less.
    from pagoda.models.gguf_loader import load_gguf_tokenizer
    from pagoda.models.loader import default_model_path
    return load_gguf_tokenizer(default_model_path())


@pytest.fixture(params=[(name, path) for name in ("tiny", "gguf") for path in PATHS],
                ids=lambda p: "-".join(p))
def tok(request):
    name, path = request.param
    return _path(request.getfixturevalue(f"{name}_raw"), path)


def detok(tokenizer, prompt="Answer: ", stop=(), include=False, skip=True, **kw):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    return IncrementalDetokenizer(tokenizer, prompt_ids, list(stop), include, skip, **kw)


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["Answer: ", "", "x😀"])
def test_one_token_at_a_time_equals_full_decode(tok, text, prompt):
    ids = ids_of(tok, text)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == text
    d = detok(tok, prompt)
    seen = []
    for t in ids:
        assert d.update([t]) is None
        seen.append(d.text)
    assert d.text == expected
    # The text only grows, and never shows a half character.
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)
    assert all("\ufffd" not in s for s in seen)


def test_multibyte_chars_really_are_split(tok):
    """Guard: the cases above do exercise characters spread over several tokens."""
    ids = ids_of(tok, "😀世")
    assert len(ids) > 2
    assert any("\ufffd" in tok.decode([t]) for t in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_chunked_updates_equal_full_decode(tok, text):
    ids = ids_of(tok, text)
    rng = random.Random(len(text))
    d = detok(tok)
    i = 0
    while i < len(ids):
        n = rng.randint(1, 4)
        d.update(ids[i:i + n])
        i += n
    assert d.text == tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_skipped_or_kept(tiny_tok):
    ids = ids_of(tiny_tok, "hello") + [tiny_tok.eos_token_id]
    d = detok(tiny_tok)
    for t in ids:
        d.update([t])
    assert d.text == "hello"
    d = detok(tiny_tok, skip=False)
    for t in ids:
        d.update([t])
    assert d.text == tiny_tok.decode(ids, skip_special_tokens=False) == "hello</s>"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_sequences(tiny_tok, data):
    """Arbitrary (even invalid UTF-8) byte-level token sequences: the incremental text is the
    full decode, except that a trailing incomplete character is held back."""
    vocab = len(tiny_tok)
    special = set(tiny_tok.all_special_ids)
    token = st.integers(0, vocab - 1).filter(lambda t: t not in special)
    prompt = data.draw(st.lists(token, max_size=8))
    ids = data.draw(st.lists(token, min_size=1, max_size=30))
    d = IncrementalDetokenizer(tiny_tok, prompt, [], False, True)
    for t in ids:
        d.update([t])
    full = tiny_tok.decode(ids, skip_special_tokens=True)
    if prompt and tiny_tok.decode(prompt).endswith("\ufffd"):
        return  # the prompt ends inside a character: the output's first bytes complete it
    if not full.endswith("\ufffd"):
        assert d.text == full
    else:
        assert full.startswith(d.text)


# ---------------------------------------------------------------------------- stop strings
def feed(d, ids):
    """Feed one token at a time; return (index of the token that stopped, stop string)."""
    for i, t in enumerate(ids):
        s = d.update([t])
        if s is not None:
            return i, s
    return None, None


def test_stop_string_split_across_tokens(tiny_tok):
    text = "abcXYZdef"
    ids = ids_of(tiny_tok, text)
    stop = "cXY"
    assert not any(stop in tiny_tok.decode([t]) for t in ids)  # it really spans tokens
    d = detok(tiny_tok, stop=[stop])
    i, s = feed(d, ids)
    assert s == stop
    assert tiny_tok.decode(ids[:i + 1]).endswith("Y")  # found by the token that completes it
    assert d.text == "ab"


def test_stop_string_included(tiny_tok):
    ids = ids_of(tiny_tok, "abcXYZdef")
    d = detok(tiny_tok, stop=["cXY"], include=True)
    _, s = feed(d, ids)
    assert s == "cXY" and d.text == "abcXY"


def test_stop_string_multibyte(tiny_tok):
    text = "ok 世界 more"
    ids = ids_of(tiny_tok, text)
    for include, expected in [(False, "ok "), (True, "ok 世界")]:
        d = detok(tiny_tok, stop=["世界"], include=include)
        i, s = feed(d, ids)
        assert s == "世界" and d.text == expected
        assert tiny_tok.decode(ids[:i + 1]) == "ok 世界"  # not before the last byte arrived


def test_stop_string_with_emoji_prefix(tiny_tok):
    ids = ids_of(tiny_tok, "a😀b😀c")
    d = detok(tiny_tok, stop=["b😀"])
    i, s = feed(d, ids)
    assert s == "b😀" and d.text == "a😀"
    assert tiny_tok.decode(ids[:i + 1]) == "a😀b😀"


def test_earliest_stop_wins_in_one_update(tiny_tok):
    ids = ids_of(tiny_tok, "abcXYZdefXY")
    d = detok(tiny_tok, stop=["def", "XY", "Zd"])
    assert d.update(ids) == "XY"
    assert d.text == "abc"


def test_earliest_position_wins_for_same_token(tiny_tok):
    # "c" completes both "bc" (starting at 1) and "abc" (starting at 0): "abc" wins.
    ids = [ids_of(tiny_tok, c)[0] for c in "abcd"]
    for stops in (["bc", "abc"], ["abc", "bc"]):
        d = detok(tiny_tok, stop=stops)
        i, s = feed(d, ids)
        assert (i, s, d.text) == (2, "abc", "")


def test_first_completed_stop_ends_stream(tiny_tok):
    ids = [ids_of(tiny_tok, c)[0] for c in "abcdef"]  # one token per character
    d = detok(tiny_tok, stop=["bcdef", "cd"])
    i, s = feed(d, ids)
    assert s == "cd" and d.text == "ab" and i == 3


def test_stop_string_in_prompt_is_ignored(tiny_tok):
    prompt_ids = ids_of(tiny_tok, "say ab")
    d = IncrementalDetokenizer(tiny_tok, prompt_ids, ["ab", "bx"], False, True)
    i, s = feed(d, ids_of(tiny_tok, "xyz"))
    assert s is None and d.text == "xyz"


def test_no_false_stop_and_overlap_window(tiny_tok):
    # A stop string whose prefix appears, then the full string much later.
    text = "aaaa" + "c" * 20 + "aab"
    ids = ids_of(tiny_tok, text)
    d = detok(tiny_tok, stop=["aab"])
    i, s = feed(d, ids)
    assert s == "aab" and d.text == "aaaa" + "c" * 20


def test_stop_string_at_very_start(tiny_tok):
    d = detok(tiny_tok, stop=["he"])
    i, s = feed(d, ids_of(tiny_tok, "hello"))
    assert s == "he" and d.text == ""


def test_min_tokens_suppresses_stop_strings(tiny_tok):
    ids = [ids_of(tiny_tok, c)[0] for c in "abab!"]
    d = detok(tiny_tok, stop=["ab"], min_tokens=3)
    i, s = feed(d, ids)
    # "ab" after tokens 1-2 is inside the first min_tokens tokens; the next "ab" ends at 4.
    assert (i, s, d.text) == (3, "ab", "ab")


class _WindowedIds:
    """The token-id tokenizer without its per-token flag: the windowed path decodes it."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f" {i}" for i in ids)


@pytest.mark.parametrize("stop", [[], [" 7 8"], [" 3", "9 1"]])
def test_per_token_path_equals_windowed_path(stop):
    from pagoda.models.loader import TokenIdTokenizer

    rng = random.Random(len(stop))
    prompt = [rng.randrange(20) for _ in range(9)]
    outputs = [rng.randrange(20) for _ in range(60)] + [7, 8, 9, 1, 3]
    fast = IncrementalDetokenizer(TokenIdTokenizer(), prompt, stop, False, True)
    slow = IncrementalDetokenizer(_WindowedIds(), prompt, stop, False, True)
    assert fast._per_token and not slow._per_token
    stopped = None
    for i in range(0, len(outputs), 3):
        stopped, want = fast.update(outputs[i:i + 3]), slow.update(outputs[i:i + 3])
        assert (stopped, fast.text) == (want, slow.text)
        if stopped is not None:
            break
    if stop:
        assert stopped in stop          # the outputs end with every stop string
    else:
        assert fast.text == TokenIdTokenizer().decode(outputs)
