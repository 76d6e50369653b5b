"""The word language model, seven ways: fp32 PyTorch, PyTorch ``quantize_dynamic``, tinyrt
dynamic mode, tinyrt integer-only with int8 weights, with int4 weights (groups of 64, HQQ)
and with each layer's bits chosen under a size budget or a perplexity limit, side by side on
held-out King James Bible text.

    python examples/train_recurrent.py --only lm     # once: trains out/lm/word_lm.safetensors
    python examples/word_lm.py [--rows 16] [--window 25]

For each runtime: perplexity on the held-out test chapters (the stream is cut into ``rows``
segments read side by side in ``window``-token calls that carry the recurrent state, so every
token is scored once given its whole segment), the model's size on disk, single-threaded
latency of one 25-token window (batch 1, from the zero state) and of one streaming step (one
token, state carried), and a continuation sampled from a prompt. Prints a markdown table and
writes it to out/lm/report.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from recurrent_models import WordLM
from safetensors.torch import load_file
from text import DATA_PATH
from torch import nn
from train_recurrent import LM_DIR, lm_step

import tinyrt
from tinyrt.bench import measure_latency
from tinyrt.converter import WeightSpec, convert

PROMPT = "in the beginning god"
# the mixed-precision rows: every layer free to take 8, 4 or 2 bits, under a budget of 6 MB
# (MiB, as the table counts) or while perplexity on the calibration text rises at most 1 %
MIXED_BUDGET = 6 * 2**20
MIXED_MAX_RISE = 1.0
# step(tokens [R, W] int64) -> logits [R, W, V] float32, carrying the runtime's own state
Step = Callable[[np.ndarray], np.ndarray]


def load_float_model() -> WordLM:
    weights = LM_DIR / "word_lm.safetensors"
    if not weights.exists():
        sys.exit(
            f"{weights} not found: train it first with python examples/train_recurrent.py --only lm"
        )
    config = json.loads((LM_DIR / "word_lm.json").read_text())
    model = WordLM(**config["model"])
    model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


def torch_stepper(model: nn.Module) -> Callable[[], Step]:
    """A fresh stream for a PyTorch model (fp32 or quantize_dynamic'ed)."""

    def new_stream() -> Step:
        state = None

        @torch.no_grad()
        def step(tokens: np.ndarray) -> np.ndarray:
            nonlocal state
            logits, state = lm_step(model, torch.from_numpy(tokens.astype(np.int64)), state)
            return logits.numpy()

        return step

    return new_stream


def tinyrt_stepper(model: tinyrt.Model, rows: int) -> Callable[[], Step]:
    def new_stream() -> Step:
        state = model.new_state(batch=rows)
        return lambda tokens: model.run({"tokens": tokens}, state=state)["output"]

    return new_stream


def perplexity(new_stream: Callable[[], Step], ids: np.ndarray, rows: int, window: int) -> float:
    """exp of the mean next-token NLL over ``rows`` side-by-side segments of ``ids``."""
    seg = (len(ids) - 1) // rows
    inputs = ids[: rows * seg].reshape(rows, seg)
    targets = ids[1 : rows * seg + 1].reshape(rows, seg)
    step, total = new_stream(), 0.0
    for s in range(0, seg, window):
        logits = step(inputs[:, s : s + window]).astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        chosen = np.take_along_axis(log_probs, targets[:, s : s + window, None], axis=-1)
        total -= chosen.sum()
    return math.exp(total / (rows * seg))


def generate(new_stream: Callable[[], Step], vocab: list[str], count: int = 30) -> str:
    """Sample a continuation of the prompt: top-10 sampling at temperature 0.8 with a fixed
    seed, the same for every runtime (unknown prompt words become <unk>)."""
    rng = np.random.default_rng(0)
    index = {word: i for i, word in enumerate(vocab)}
    tokens = [index.get(word, index["<unk>"]) for word in PROMPT.split()]
    step = new_stream()
    logits = step(np.array([tokens]))[0, -1]
    words = []
    for _ in range(count):
        top = np.argsort(logits)[-10:]
        weights = np.exp((logits[top] - logits[top].max()) / 0.8)
        token = int(rng.choice(top, p=weights / weights.sum()))
        words.append(vocab[token])
        logits = step(np.array([[token]]))[0, -1]
    return " ".join(words).replace(" <eos> ", " / ")


def torch_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(state_dict)``, as PyTorch's ``print_size_of_model`` measures."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="segments read side by side")
    parser.add_argument("--window", type=int, default=25, help="tokens per call")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per latency")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with np.load(DATA_PATH) as data:
        vocab, test_ids, calib = list(data["vocab"]), data["test_ids"], data["calib_ids"]
    model = load_float_model()
    # 256-token calibration windows (the time axis is dynamic, so any length runs later)
    example = torch.from_numpy(calib[:1].astype(np.int64))
    static_path, dynamic_path = LM_DIR / "word_lm.tinyrt", LM_DIR / "word_lm_dynamic.tinyrt"
    convert(model, example, static_path, calibration=calib.astype(np.int64), source="WordLM")
    convert(model, example, dynamic_path, mode="dynamic", source="WordLM")
    dynamic_torch = torch.ao.quantization.quantize_dynamic(
        model, {nn.LSTM, nn.Linear}, dtype=torch.qint8
    )
    low_bit = {
        "tinyrt int4 g64 HQQ": WeightSpec(bits=4),
        f"tinyrt mixed, {MIXED_BUDGET / 2**20:g} MB budget": WeightSpec(
            bits=2, size_budget=MIXED_BUDGET, keep_8bit=()
        ),
        f"tinyrt mixed, perplexity +{MIXED_MAX_RISE:g}% limit": WeightSpec(
            bits=2, max_drop=MIXED_MAX_RISE, drop_metric="perplexity", keep_8bit=()
        ),
    }
    # the limit is measured on the calibration windows, each token's label the next one
    inputs, labels = calib[:, :-1].astype(np.int64), calib[:, 1:].astype(np.int64)
    paths = {}
    for i, (name, spec) in enumerate(low_bit.items()):
        paths[name] = LM_DIR / f"word_lm_low_bit_{i}.tinyrt"
        first = torch.from_numpy(inputs[:1])
        convert(model, first, paths[name], inputs, weight_spec=spec, labels=labels)
        print(f"{name}: {paths[name].stat().st_size} bytes", flush=True)
    static, dynamic = tinyrt.load(static_path), tinyrt.load(dynamic_path)
    runtimes = {
        "PyTorch fp32": (torch_stepper(model), torch_bytes(model), partial(torch_stepper, model)),
        "PyTorch quantize_dynamic": (
            torch_stepper(dynamic_torch),
            torch_bytes(dynamic_torch),
            partial(torch_stepper, dynamic_torch),
        ),
        "tinyrt dynamic": (
            tinyrt_stepper(dynamic, args.rows),
            dynamic_path.stat().st_size,
            partial(tinyrt_stepper, dynamic, 1),
        ),
        "tinyrt integer-only": (
            tinyrt_stepper(static, args.rows),
            static_path.stat().st_size,
            partial(tinyrt_stepper, static, 1),
        ),
    }
    for name, path in paths.items():
        low = tinyrt.load(path)
        runtimes[name] = (
            tinyrt_stepper(low, args.rows),
            path.stat().st_size,
            partial(tinyrt_stepper, low, 1),
        )
    window = calib[:1, : args.window]
    one = calib[:1, :1]
    rows, samples = [], {}
    for name, (streams, size, single) in runtimes.items():
        ppl = perplexity(streams, test_ids, args.rows, args.window)
        fresh = single()
        window_us = measure_latency(lambda fresh=fresh: fresh()(window), runs=args.runs, warmup=5)
        stream = single()()
        step_us = measure_latency(lambda stream=stream: stream(one), runs=args.runs * 5, warmup=20)
        rows.append((name, ppl, size, window_us["p50"], step_us["p50"]))
        samples[name] = generate(single(), vocab)
        print(f"{name}: perplexity {ppl:.2f}", flush=True)

    base = rows[0][1]
    lines = [
        "| runtime | test perplexity | vs fp32 | size | 25-token window | streaming step |",
        "|---|---|---|---|---|---|",
    ]
    for name, ppl, size, window_p50, step_p50 in rows:
        lines.append(
            f"| {name} | {ppl:.2f} | {ppl / base - 1:+.2%} | {size / 2**20:.2f} MB "
            f"| {window_p50 / 1000:.2f} ms | {step_p50 / 1000:.2f} ms |"
        )
    lines += ["", f'Sampled continuations of "{PROMPT}" (same seed for every runtime):', ""]
    lines += [f"* {name}: {text}" for name, text in samples.items()]
    report = "\n".join(lines)
    print(report)
    (LM_DIR / "report.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
