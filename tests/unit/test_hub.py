"""Hugging Face Hub ids (pagoda/models/hub.py) against a Hub cache the tests build, offline:
ORG/NAME, @REVISION (a commit and a ref), GGUF files by :QUANT and --gguf-file, the errors of
a miss, a local path winning over an id, and an engine loaded from an id generating what the
same files loaded by path generate."""

import hashlib
import os
import shutil

import pytest

from pagoda import LLM, SamplingParams
from pagoda.entrypoints import cli
from pagoda.models.hub import choose_gguf, parse_hub_id, resolve_model
from pagoda.models.loader import default_model_path, load_model
from tiny_models import TINY_VOCAB, make_model

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
GGUF_NAMES = ["tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf", "tiny-Q8_0.gguf", "tiny-IQ8_0.gguf",
              "mmproj-tiny-f16.gguf"]


def add_to_cache(cache, repo_id, files, commit, refs=("main",)):
    """Lay ``files`` ({name in the repo: local file}) out as huggingface_hub does: content-
    addressed blobs, a snapshot of symlinks per commit, refs naming commits."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for name, src in files.items():
        blob = storage / "blobs" / hashlib.sha256(open(src, "rb").read()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(src, blob)  # the bundled GGUF: no 100 MB copy where one file system
            except OSError:
                shutil.copyfile(src, blob)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return str(storage / "snapshots" / commit)


def dir_files(path, skip=()):
    return {f: os.path.join(path, f) for f in os.listdir(path) if f not in skip}


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("hub_tiny_a")), "llama", seed=3)


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("hub_tiny_b")), "qwen3", seed=4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache in HF_HUB_CACHE, offline (the environment and huggingface_hub's
    constants, which it read at import), with an endpoint nothing listens on."""
    from huggingface_hub import constants

    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return path


@pytest.fixture
def gguf_repo(cache, tmp_path):
    files = {}
    for name in GGUF_NAMES:
        (tmp_path / name).write_bytes(name.encode())  # resolution never parses them
        files[name] = str(tmp_path / name)
    return add_to_cache(cache, "org/tiny-GGUF", files, COMMIT_A)


@pytest.mark.parametrize("text, want", [
    ("Qwen/Qwen3-0.6B", ("Qwen/Qwen3-0.6B", None, None)),
    ("org/name@v1.0", ("org/name", "v1.0", None)),
    ("org/name-GGUF:q4_k_m", ("org/name-GGUF", None, "q4_k_m")),
    (f"org/name@{COMMIT_A}:Q8_0", ("org/name", COMMIT_A, "Q8_0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1", None)),
])
def test_parse_hub_id(text, want):
    hub = parse_hub_id(text)
    assert hub is not None and (hub.repo_id, hub.revision, hub.quant) == want
    assert hub.typed == text


@pytest.mark.parametrize("text", ["/abs/dir", "./org/name", "~/org/name", "a/b/c", "model.gguf",
                                  "org/na--me", "org/name:", "org/name@"])
def test_paths_are_not_hub_ids(text):
    assert parse_hub_id(text) is None


def test_missing_path_that_is_no_hub_id_says_so(cache):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("a/b/c")


def test_org_name_resolves_to_the_cached_snapshot(cache, tiny_a):
    snapshot = add_to_cache(cache, "org/tiny", dir_files(tiny_a), COMMIT_A)
    source = resolve_model("org/tiny")
    assert source.path == snapshot and source.name == "org/tiny"


def test_revision_by_commit_and_by_ref(cache, tiny_a, tiny_b):
    a = add_to_cache(cache, "org/tiny", dir_files(tiny_a), COMMIT_A, refs=("main",))
    b = add_to_cache(cache, "org/tiny", dir_files(tiny_b), COMMIT_B, refs=("v2",))
    assert resolve_model("org/tiny").path == a
    assert resolve_model(f"org/tiny@{COMMIT_B}").path == b
    assert resolve_model("org/tiny@v2").path == b
    assert resolve_model("org/tiny@v2").name == "org/tiny@v2"
    with pytest.raises(FileNotFoundError, match="--revision v3"):
        resolve_model("org/tiny@v3")


def test_local_path_wins_over_a_hub_id(cache, tiny_a, tiny_b, tmp_path, monkeypatch):
    add_to_cache(cache, "org/tiny", dir_files(tiny_b), COMMIT_A)
    shutil.copytree(tiny_a, tmp_path / "work" / "org" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model("org/tiny").path == "org/tiny"


@pytest.mark.parametrize("quant, want", [("q4_k_m", "tiny-Q4_K_M.gguf"), ("Q8_0", "tiny-Q8_0.gguf"),
                                         ("iq8_0", "tiny-IQ8_0.gguf")])
def test_gguf_by_quant_tag(gguf_repo, quant, want):
    source = resolve_model(f"org/tiny-GGUF:{quant}")
    assert source.path == os.path.join(gguf_repo, want)
    assert source.name == f"org/tiny-GGUF:{quant}"


def test_gguf_by_file(gguf_repo):
    source = resolve_model("org/tiny-GGUF", gguf_file="tiny-Q8_0.gguf")
    assert source.path == os.path.join(gguf_repo, "tiny-Q8_0.gguf")
    assert source.name == "org/tiny-GGUF"
    with pytest.raises(ValueError, match="give one"):
        resolve_model("org/tiny-GGUF:Q8_0", gguf_file="tiny-Q8_0.gguf")


def test_gguf_tag_errors_list_the_candidates(gguf_repo):
    with pytest.raises(ValueError, match="tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf"):
        resolve_model("org/tiny-GGUF:Q4_K")
    with pytest.raises(FileNotFoundError, match="Q5_K.*tiny-IQ8_0.gguf"):
        resolve_model("org/tiny-GGUF:Q5_K")
    with pytest.raises(ValueError, match="org/tiny-GGUF:QUANT or --gguf-file.*tiny-Q8_0.gguf"):
        resolve_model("org/tiny-GGUF")  # no config.json, several GGUF files


def test_choose_gguf():
    files = ["README.md", "m-Q4_0.gguf", "mmproj-Q4_0.gguf", "big/m-Q8_0-00001-of-00002.gguf",
             "big/m-Q8_0-00002-of-00002.gguf"]
    assert choose_gguf(files, "q4_0", "r") == "m-Q4_0.gguf"  # the projector is never chosen
    with pytest.raises(ValueError, match="split GGUF"):
        choose_gguf(files, "Q8_0", "r")


def test_hub_out_of_reach_falls_back_to_the_cache(cache, tiny_a, gguf_repo, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) with the Hub refusing connections: cached files serve."""
    from huggingface_hub import HfApi, constants

    def unreachable(*args, **kwargs):  # as huggingface_hub's own calls fail, without retries
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_repo_files", unreachable)
    snapshot = add_to_cache(cache, "org/tiny", dir_files(tiny_a), COMMIT_A)
    assert resolve_model("org/tiny").path == snapshot
    assert resolve_model("org/tiny-GGUF:Q8_0").path == os.path.join(gguf_repo, "tiny-Q8_0.gguf")
    assert resolve_model("org/tiny-GGUF", "tiny-Q8_0.gguf").path.startswith(gguf_repo)
    with pytest.raises(FileNotFoundError, match="could not be reached.*\n.*hf download org/absent"):
        resolve_model("org/absent")


def test_offline_miss_names_files_and_fetch_command(cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("org/absent")
    text = str(e.value)
    assert "config.json" in text and "*.safetensors" in text and "HF_HUB_OFFLINE" in text
    assert "hf download org/absent --include" in text and str(cache) in text
    with pytest.raises(FileNotFoundError, match="--revision v1"):
        resolve_model("org/absent@v1")
    with pytest.raises(FileNotFoundError, match=r"\*Q4_K_M\*\.gguf.*\n.*hf download org/absent-GGUF"):
        resolve_model("org/absent-GGUF:Q4_K_M")
    with pytest.raises(FileNotFoundError, match="hf download org/absent-GGUF m.gguf"):
        resolve_model("org/absent-GGUF", gguf_file="m.gguf")


def test_offline_miss_of_some_shards_names_them(cache, tiny_a, tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors", '
                     '"b": "model-00002-of-00002.safetensors"}}')
    files = dir_files(tiny_a, skip=("model.safetensors",))
    files["model.safetensors.index.json"] = str(index)
    files["model-00001-of-00002.safetensors"] = os.path.join(tiny_a, "model.safetensors")
    add_to_cache(cache, "org/sharded", files, COMMIT_A)
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("org/sharded")
    assert "model-00002-of-00002.safetensors is not in the Hugging Face cache" in str(e.value)
    assert "model-00001" not in str(e.value)


def test_dummy_weights_need_only_config_and_tokenizer(cache, tiny_a):
    import torch

    add_to_cache(cache, "org/tiny", dir_files(tiny_a, skip=("model.safetensors",)), COMMIT_A)
    loaded = load_model("org/tiny", torch.float32, torch.device("cpu"), load_format="dummy")
    assert loaded.name == "dummy:org/tiny" and loaded.arch.vocab_size == TINY_VOCAB
    with pytest.raises(FileNotFoundError, match="hf download org/tiny --include"):
        load_model("org/tiny", torch.float32, torch.device("cpu"))


def test_dummy_weights_of_a_gguf_repo_are_refused(gguf_repo):
    import torch

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model("org/tiny-GGUF", torch.float32, torch.device("cpu"), load_format="dummy")


def test_serve_takes_the_model_positionally():
    ns = cli.build_parser().parse_args(["serve", "org/tiny", "--port", "0"])
    cli._positional_model(ns)
    assert ns.model == "org/tiny"
    ns = cli.build_parser().parse_args(["serve", "org/tiny", "--model", "org/other"])
    with pytest.raises(ValueError, match="two models"):
        cli._positional_model(ns)


def greedy_ids(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params)]


@pytest.mark.usefixtures("one_thread")
def test_engine_from_hub_id_equals_engine_from_path(cache, tiny_a):
    add_to_cache(cache, "org/tiny", dir_files(tiny_a), COMMIT_A)
    prompts = ["The quick brown fox", [5, 17, 99, 3]]
    by_id = LLM("org/tiny", dtype="float32", max_model_len=64)
    assert by_id.engine.model_name == "org/tiny"  # what /v1/models lists
    by_path = LLM(tiny_a, dtype="float32", max_model_len=64)
    assert greedy_ids(by_id, prompts) == greedy_ids(by_path, prompts)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_gguf_engine_from_hub_id_equals_engine_from_path(cache):
    path = default_model_path()
    add_to_cache(cache, "org/SmolLM2-GGUF", {os.path.basename(path): path}, COMMIT_A)
    prompts = ["Name a river.", [5, 17, 99, 3]]
    by_path = greedy_ids(LLM(path, dtype="float32", max_model_len=64), prompts)
    by_tag = LLM("org/SmolLM2-GGUF:q4_1", dtype="float32", max_model_len=64)
    assert by_tag.engine.model_name == "org/SmolLM2-GGUF:q4_1"
    assert greedy_ids(by_tag, prompts) == by_path
    by_file = LLM("org/SmolLM2-GGUF", gguf_file=os.path.basename(path), dtype="float32",
                  max_model_len=64)
    assert greedy_ids(by_file, prompts) == by_path
