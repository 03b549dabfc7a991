"""What Ollama's model listing reports about the weights (entrypoints/ollama/models.py): the
parameter count from the config, every expert included, equal to the checkpoint's matrices;
a GGUF's size on disk."""
from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file
from tiny_models import make_model

from pagoda.entrypoints.ollama.models import parameter_count, parameter_size
from pagoda.models.config import ModelArch


def checkpoint_matrices(path: str) -> int:
    tensors: dict = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return sum(t.numel() for t in tensors.values() if t.dim() >= 2)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_the_parameter_count_is_the_checkpoint_s_matrices(tmp_path, family):
    import json

    path = make_model(str(tmp_path / family), family, seed=1)
    with open(os.path.join(path, "config.json")) as f:
        arch = ModelArch.from_hf_config(json.load(f))
    assert parameter_count(arch) == checkpoint_matrices(path)


def test_parameter_size_reads_as_ollama_writes_it():
    assert [parameter_size(n) for n in (134_515_008, 1_700_000_000, 28_000, 7)] == [
        "135M", "1.7B", "28K", "7"]
