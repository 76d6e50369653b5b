"""File sizes of the classic word language model (PyTorch's word_language_model example:
33,278-word vocabulary, 512-dim embedding, 5 LSTM layers of 256) at every weight setting,
next to PyTorch's ``print_size_of_model`` numbers (``torch.save`` of the state dict).

    python benchmarks/lowbit_sizes.py

The weights are random (seeded; Wikitext-2 is not available offline), so this measures
sizes only; perplexities are in the README's table for the trained 8,350-word model. Writes
benchmarks/results/lowbit_sizes.{md,json}.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from recurrent_models import WordLM  # noqa: E402

import tinyrt  # noqa: E402
from tinyrt.converter import WeightSpec, convert  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = {"vocab_size": 33_278, "embed": 512, "hidden": 256, "layers": 5}
BUDGET = 15_000_000
SETTINGS = {
    "tinyrt int8 per channel": WeightSpec(),
    "tinyrt int4 g64 HQQ": WeightSpec(bits=4),
    "tinyrt int4 g128 HQQ": WeightSpec(bits=4, group_size=128),
    # every layer free: the embedding alone is 17 MB at 8 bits
    f"tinyrt mixed, {BUDGET:,} byte budget": WeightSpec(bits=2, size_budget=BUDGET, keep_8bit=()),
}


def torch_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(state_dict)``, as PyTorch's ``print_size_of_model`` measures."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main() -> None:
    torch.manual_seed(0)
    model = WordLM(**CONFIG).eval()
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (16, 64))
    dynamic = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, torch.qint8)
    rows = [
        ("PyTorch fp32", torch_bytes(model), ""),
        ("PyTorch quantize_dynamic", torch_bytes(dynamic), ""),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in SETTINGS.items():
            path = Path(tmp) / "lm.tinyrt"
            example = torch.from_numpy(tokens[:1])
            convert(model, example, path, tokens, progress=False, weight_spec=spec)
            provenance = tinyrt.load(path).file.provenance
            chosen = provenance.get("mixed_precision", {}).get("layers", "")
            rows.append((name, path.stat().st_size, json.dumps(chosen) if chosen else ""))
            print(name, rows[-1][1], flush=True)
    lines = [
        "The classic word LM (33,278 words, 512-dim embedding, 5 LSTM layers of 256; random "
        "weights: sizes only), bytes on disk (`python benchmarks/lowbit_sizes.py`). PyTorch: "
        "`torch.save` of the state dict.",
        "",
        "| model | bytes | MB | layers below 8 bits |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {b:,} | {b / 1e6:.2f} | {c} |" for n, b, c in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowbit_sizes.md").write_text(table)
    record = [{"model": n, "bytes": b, "lowered": c} for n, b, c in rows]
    (RESULTS / "lowbit_sizes.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
