"""Train tinyrt's recurrent example networks and write their weights and sample data.

Usage (from the repository root)::

    python examples/train_recurrent.py             # both models
    python examples/train_recurrent.py --only gru  # Mnist1dGRU, about 1 minute
    python examples/train_recurrent.py --only lm   # WordLM on the KJV, about 17 minutes

``--only gru`` writes ``examples/weights/mnist1d_gru.safetensors`` (fp32 state dict) and
``examples/data/mnist1d_seq.npz`` (float32 ``calib_x [256, 40, 1]`` from the training split,
float32 ``test_x [1000, 40, 1]`` and int64 ``test_y``: the mnist1d data of ``train.py`` as
sequences). Same protocol as ``train.py``: a validation split carved from the training data
picks the best epoch; the test split is used for nothing else but the final accuracy.

``--only lm`` fetches the King James Bible with ``examples/text.py`` (Debian's ``bible-kjv``
packages), checks that its vocabulary and held-out ids equal ``examples/data/kjv.npz``, trains
``WordLM`` on the training chapters with truncated back-propagation through time and writes
``out/lm/word_lm.safetensors`` (fp32 state dict, 33 MB: not committed) and
``out/lm/word_lm.json`` (``"model"``: the keyword arguments, ``WordLM(**info["model"])``;
training settings, per-epoch log and perplexities). The validation chapters pick the best
epoch.

Perplexity is ``exp`` of the mean next-token NLL over a split's id stream (every token but the
first scored once). "carried": the stream is cut into 16 contiguous segments read in
consecutive 35-token windows, the LSTM state passed from window to window (as in training);
"reset": independent consecutive 35-token windows, each from the zero state (what
``WordLM.forward`` computes, and what a converted model run window by window computes).

Fixed seeds, deterministic algorithms, single-threaded by default (``--threads``: a second
thread helps little on 2 shared cores and collapses under contention). Outputs are
reproducible on one machine with one thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from recurrent_models import Mnist1dGRU, WordLM
from safetensors.torch import save_file
from torch import nn
from train import Split, accuracy, fit_classifier

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WEIGHTS_DIR = HERE / "weights"
DATA_DIR = HERE / "data"
LM_DIR = ROOT / "out" / "lm"
SEED = 0
CALIB_SIZE = 256
EVAL_ROWS = 16


# --------------------------------------------------------------------------------------------
# Mnist1dGRU


@dataclass(frozen=True)
class GruConfig:
    """Training settings of the mnist1d GRU (AdamW, one-cycle LR, gradient-norm clipping)."""

    hidden: int = 64
    layers: int = 1
    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    clip: float = 1.0
    n_val: int = 400


def mnist1d_sequences() -> dict[str, np.ndarray]:
    """mnist1d (local generator, seed 42) as ``[N, 40, 1]`` sequences: train/val/test/calib.

    The validation and calibration draws are those of ``train.py`` (same seeds, same sizes),
    so both scripts see the same training, validation and test samples.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x = d["x"].astype(np.float32)[:, :, None]
    y = d["y"].astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(y))
    n_val = GruConfig.n_val
    train_x, train_y = x[perm[n_val:]], y[perm[n_val:]]
    calib_idx = np.random.default_rng(SEED + 1).choice(len(train_y), CALIB_SIZE, replace=False)
    return {
        "train_x": train_x,
        "train_y": train_y,
        "val_x": x[perm[:n_val]],
        "val_y": y[perm[:n_val]],
        "test_x": d["x_test"].astype(np.float32)[:, :, None],
        "test_y": d["y_test"].astype(np.int64),
        "calib_x": train_x[np.sort(calib_idx)],
    }


def train_gru(args: argparse.Namespace) -> None:
    """Train ``Mnist1dGRU`` and write its weights and sequence data."""
    torch.set_num_threads(1)
    cfg = GruConfig()
    t0 = time.perf_counter()
    data = mnist1d_sequences()
    torch.manual_seed(SEED)
    model = Mnist1dGRU(hidden=cfg.hidden, layers=cfg.layers)
    t1 = time.perf_counter()
    val_acc = fit_classifier(
        model,
        Split(data["train_x"], data["train_y"]),
        Split(data["val_x"], data["val_y"]),
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        clip=cfg.clip,
    )
    t2 = time.perf_counter()
    test_acc = accuracy(model, data["test_x"], data["test_y"])
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    weights = WEIGHTS_DIR / "mnist1d_gru.safetensors"
    seq = DATA_DIR / "mnist1d_seq.npz"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    np.savez_compressed(seq, calib_x=data["calib_x"], test_x=data["test_x"], test_y=data["test_y"])
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"gru: Mnist1dGRU(hidden={cfg.hidden}, layers={cfg.layers}), {n_params} parameters, "
        f"data {t1 - t0:.1f} s, train {t2 - t1:.1f} s, val acc {val_acc:.2%}, "
        f"fp32 test acc {test_acc:.2%} ({len(data['test_y'])} samples)"
    )
    print(
        f"  wrote {weights.relative_to(ROOT)} ({weights.stat().st_size} B), "
        f"{seq.relative_to(ROOT)} ({seq.stat().st_size} B)"
    )


# --------------------------------------------------------------------------------------------
# WordLM


@dataclass(frozen=True)
class LmConfig:
    """Model and training settings of the KJV word-level language model."""

    embed: int = 512
    hidden: int = 256
    layers: int = 3
    dropout: float = 0.2
    epochs: int = 2
    batch_size: int = 32
    bptt: int = 35
    lr: float = 2e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    warmup: float = 0.05


State = tuple[torch.Tensor, torch.Tensor]


def lm_step(model: WordLM, tokens: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
    """``WordLM.forward`` with an explicit LSTM state in and out: ``(logits, state)``."""
    x = model.dropout_in(model.embedding(tokens))
    out, state = model.lstm(x, state)
    return model.fc(model.dropout_out(out)), state


@torch.no_grad()
def perplexity(
    model: WordLM, ids: np.ndarray, bptt: int = 35, carry: bool = True, rows: int = EVAL_ROWS
) -> float:
    """``exp`` of the mean NLL of ``ids[1:]``, each token scored once given its prefix.

    With ``carry`` the stream is cut into ``rows`` contiguous segments (read side by side as
    one batch; the few leftover tokens continue the last segment) and each segment is read in
    ``bptt``-token windows passing the LSTM state on: every token sees its whole segment
    before it. Otherwise the stream is cut into independent ``bptt``-token windows, each read
    from the zero state by ``model.forward``.
    """
    model.eval()
    stream = torch.from_numpy(ids.astype(np.int64))
    n = len(stream) - 1

    def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
        return float(
            nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        )

    total = 0.0
    if carry:
        seg = n // rows
        inputs, targets = stream[: rows * seg].view(rows, seg), stream[1 : rows * seg + 1]
        targets = targets.view(rows, seg)
        state: State | None = None
        for s in range(0, seg, bptt):
            logits, state = lm_step(model, inputs[:, s : s + bptt], state)
            total += nll(logits, targets[:, s : s + bptt])
        if n > rows * seg:
            assert state is not None
            last = (state[0][:, -1:].contiguous(), state[1][:, -1:].contiguous())
            logits, _ = lm_step(model, stream[rows * seg : n][None], last)
            total += nll(logits, stream[rows * seg + 1 : n + 1][None])
    else:
        full = n // bptt
        inputs = stream[: full * bptt].view(full, bptt)
        targets = stream[1 : full * bptt + 1].view(full, bptt)
        for i in range(0, full, 256):
            total += nll(model(inputs[i : i + 256]), targets[i : i + 256])
        if n > full * bptt:
            total += nll(
                model(stream[full * bptt : n][None]), stream[full * bptt + 1 : n + 1][None]
            )
    return math.exp(total / n)


def fit_lm(
    model: WordLM,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    cfg: LmConfig,
    limit_steps: int | None = None,
) -> tuple[float, list[dict[str, float]]]:
    """Truncated-BPTT training of ``model`` in place; keep the best-validation epoch.

    The training stream is cut into ``batch_size`` contiguous rows read in ``bptt``-token
    windows, the state carried (detached) from window to window and reset every epoch. AdamW
    with a linear warm-up and cosine decay, gradient-norm clipping. Returns the best
    validation perplexity (state carried) and a per-epoch log.
    """
    rows = len(train_ids) // cfg.batch_size
    data = torch.from_numpy(train_ids[: rows * cfg.batch_size].astype(np.int64))
    data = data.view(cfg.batch_size, rows)
    starts = list(range(0, rows - 1, cfg.bptt))
    if limit_steps is not None:
        starts = starts[:limit_steps]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        epochs=cfg.epochs,
        steps_per_epoch=len(starts),
        pct_start=cfg.warmup,
        anneal_strategy="cos",
    )
    loss_fn = nn.CrossEntropyLoss()
    best_ppl, best_state = math.inf, copy.deepcopy(model.state_dict())
    log: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        state: State | None = None
        total, count = 0.0, 0
        for step, s in enumerate(starts):
            e = min(s + cfg.bptt, rows - 1)
            x, y = data[:, s:e], data[:, s + 1 : e + 1]
            if state is not None:
                state = (state[0].detach(), state[1].detach())
            opt.zero_grad(set_to_none=True)
            logits, state = lm_step(model, x, state)
            loss = loss_fn(logits.flatten(0, 1), y.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * y.numel()
            count += y.numel()
            if step % 100 == 99:
                rate = count / (time.perf_counter() - t0)
                print(
                    f"  epoch {epoch + 1} step {step + 1}/{len(starts)}: train ppl "
                    f"{math.exp(total / count):.1f}, {rate:.0f} tokens/s",
                    flush=True,
                )
        t1 = time.perf_counter()
        val_ppl = perplexity(model, valid_ids, cfg.bptt, carry=True)
        log.append(
            {
                "epoch": epoch + 1,
                "train_ppl": math.exp(total / count),
                "valid_ppl": val_ppl,
                "train_s": t1 - t0,
                "eval_s": time.perf_counter() - t1,
            }
        )
        print(
            f"  epoch {epoch + 1}: train ppl {math.exp(total / count):.2f}, valid ppl "
            f"{val_ppl:.2f} ({t1 - t0:.0f} s + {time.perf_counter() - t1:.0f} s eval)",
            flush=True,
        )
        if val_ppl <= best_ppl:
            best_ppl, best_state = val_ppl, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return best_ppl, log


def train_lm(args: argparse.Namespace) -> None:
    """Fetch the KJV, train ``WordLM`` and write ``out/lm/word_lm.{safetensors,json}``."""
    from text import DATA_PATH, kjv_corpus

    torch.set_num_threads(args.threads)
    cfg = LmConfig(**({"epochs": args.epochs} if args.epochs is not None else {}))
    t0 = time.perf_counter()
    corpus = kjv_corpus(use_installed=args.installed)
    with np.load(DATA_PATH, allow_pickle=False) as shipped:
        if (
            shipped["vocab"].tolist() != corpus.vocab
            or not np.array_equal(shipped["valid_ids"], corpus.valid)
            or not np.array_equal(shipped["test_ids"], corpus.test)
        ):
            raise RuntimeError(f"{DATA_PATH} differs from the text: rerun examples/text.py")
    torch.manual_seed(SEED)
    model = WordLM(len(corpus.vocab), cfg.embed, cfg.hidden, cfg.layers, cfg.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"lm: WordLM(vocab={len(corpus.vocab)}, embed={cfg.embed}, hidden={cfg.hidden}, "
        f"layers={cfg.layers}), {n_params} parameters; {len(corpus.train)} training tokens",
        flush=True,
    )
    t1 = time.perf_counter()
    best_val, log = fit_lm(model, corpus.train, corpus.valid, cfg, args.limit_steps)
    t2 = time.perf_counter()
    results = {
        f"{split}_ppl_{mode}": perplexity(model, ids, cfg.bptt, carry=mode == "carried")
        for split, ids in (("valid", corpus.valid), ("test", corpus.test))
        for mode in ("carried", "reset")
    }
    t3 = time.perf_counter()
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "word_lm.safetensors"
    meta = out_dir / "word_lm.json"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    info = {
        "spec": "examples/recurrent_models.py:WordLM",
        "model": {
            "vocab_size": len(corpus.vocab),
            "embed": cfg.embed,
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "dropout": cfg.dropout,
        },
        "vocab_size": len(corpus.vocab),
        "data": "examples/data/kjv.npz",
        "parameters": n_params,
        "training": {
            **asdict(cfg),
            "threads": args.threads,
            "seed": SEED,
            "limit_steps": args.limit_steps,
            "train_tokens": len(corpus.train),
            "torch": torch.__version__,
            "train_s": round(t2 - t1, 1),
        },
        "epochs": log,
        "results": {k: round(v, 3) for k, v in results.items()},
    }
    meta.write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"lm: data {t1 - t0:.1f} s, train {t2 - t1:.1f} s, eval {t3 - t2:.1f} s; best valid ppl "
        f"{best_val:.2f}; fp32 perplexity (state carried / reset every 35 tokens): valid "
        f"{results['valid_ppl_carried']:.2f} / {results['valid_ppl_reset']:.2f}, test "
        f"{results['test_ppl_carried']:.2f} / {results['test_ppl_reset']:.2f}"
    )
    print(f"  wrote {weights} ({weights.stat().st_size} B), {meta}")


TASKS = {"gru": train_gru, "lm": train_lm}


def main(argv: list[str] | None = None) -> None:
    """Train the selected recurrent example models and report time and fp32 results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(TASKS), help="train only this model")
    parser.add_argument("--epochs", type=int, help=f"LM epochs (default {LmConfig.epochs})")
    parser.add_argument("--threads", type=int, default=1, help="LM torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=LM_DIR, help="LM output directory")
    parser.add_argument(
        "--limit-steps", type=int, help="LM: stop every epoch after this many steps (smoke test)"
    )
    parser.add_argument(
        "--installed", action="store_true", help="LM: read the KJV with /usr/bin/bible"
    )
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    for name in [args.only] if args.only else list(TASKS):
        TASKS[name](args)


if __name__ == "__main__":
    main()
