"""``python -m pagoda.bench.kv_accuracy`` end to end on a tiny model: every mode reports a
perplexity over the text and its greedy agreement with the first mode (which agrees with
itself), and a 4-bit mode is measured with every step on its weights."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pagoda.bench import kv_accuracy
from pagoda.models import cpu_int4
from tiny_models import make_model

from native import needs_ext


@needs_ext
def test_modes_report_perplexity_and_agreement(tmp_path: Path, monkeypatch) -> None:
    model = make_model(str(tmp_path / "m"), "llama", seed=2)
    text = tmp_path / "text.txt"
    text.write_text("Paged attention keeps the KV cache in fixed-size blocks. " * 12)
    seen: list[str | None] = []
    int4_attach = cpu_int4.attach_int4

    def spy(model, *route):   # the row limit in force when the 4-bit weights are made
        seen.append(os.environ.get(cpu_int4.MAX_ROWS_ENV))
        return int4_attach(model, *route)

    monkeypatch.setattr(cpu_int4, "attach_int4", spy)
    out = tmp_path / "acc.json"
    assert kv_accuracy.main(["--model", model, "--dtype", "float32", "--text", str(text),
                             "--window", "40", "--chunk", "8", "--prompts", "3",
                             "--prompt-len", "6", "--max-tokens", "5",
                             "--kv-cache-dtype", "auto", "fp8", "--quantization", "int4",
                             "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["auto", "fp8", "int4"]
    assert seen == [str(1 << 30)]
    for mode in report["modes"].values():
        assert mode["tokens"] > 40 and math.isfinite(mode["perplexity"])
        assert mode["perplexity"] == math.exp(mode["nll"]) > 1
    first = report["modes"]["auto"]["greedy_vs_first_mode"]
    assert first == {"identical": 3, "of": 3, "mean_common_prefix": 5.0}
    assert report["modes"]["int4"]["quantization"] == "int4"
    assert report["modes"]["fp8"]["kv_dtype"] == "float8_e4m3fn"
