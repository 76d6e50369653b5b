"""Train the two example networks and write their weights and sample data.

Usage (from the repository root)::

    python examples/train.py                 # both models
    python examples/train.py --only mnist1d  # or --only digits

Writes ``examples/weights/{mnist1d,digits}_cnn.safetensors`` (fp32 state dicts) and
``examples/data/{mnist1d,digits}.npz`` holding float32 ``calib_x`` (256 training samples for
activation calibration), float32 ``test_x`` and int64 ``test_y`` (the full held-out test split).
The test split is never used for training, model selection or calibration: a validation split
carved from the training data picks the best epoch.

Runs single-threaded with fixed seeds, so the outputs are reproducible on one machine.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from models import DigitsCNN, Mnist1dCNN
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
DATA_DIR = HERE / "data"
SEED = 0
CALIB_SIZE = 256


@dataclass
class Split:
    """Float32 inputs and int64 labels of one dataset split."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Recipe:
    """Everything needed to train one example model."""

    name: str
    model: nn.Module
    train: Split
    val: Split
    test: Split
    calib_x: np.ndarray
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int


def _split_off(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[Split, Split]:
    """Randomly split ``n`` samples off ``(x, y)``; return ``(rest, split_off)``."""
    perm = np.random.default_rng(seed).permutation(len(y))
    return Split(x[perm[n:]], y[perm[n:]]), Split(x[perm[:n]], y[perm[:n]])


def _splits(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n_val: int
) -> tuple[Split, Split, Split, np.ndarray]:
    """Cast to float32/int64, carve a validation split and draw calibration samples."""
    x, x_test = x.astype(np.float32), x_test.astype(np.float32)
    y, y_test = y.astype(np.int64), y_test.astype(np.int64)
    train, val = _split_off(x, y, n_val, SEED)
    calib_idx = np.random.default_rng(SEED + 1).choice(len(train.y), CALIB_SIZE, replace=False)
    return train, val, Split(x_test, y_test), train.x[np.sort(calib_idx)]


def mnist1d_recipe() -> Recipe:
    """mnist1d from the package's local generator (seed 42): 4000 train / 1000 test."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    train, val, test, calib = _splits(
        d["x"][:, None, :], d["y"], d["x_test"][:, None, :], d["y_test"], n_val=400
    )
    torch.manual_seed(SEED)
    return Recipe(
        "mnist1d",
        Mnist1dCNN(),
        train,
        val,
        test,
        calib,
        epochs=60,
        lr=3e-3,
        weight_decay=1e-4,
        batch_size=64,
    )


def digits_recipe() -> Recipe:
    """scikit-learn's bundled digits, scaled to [0, 1]; stratified 70 / 30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    train, val, test, calib = _splits(x_tr, y_tr, x_te, y_te, n_val=126)
    torch.manual_seed(SEED)
    return Recipe(
        "digits",
        DigitsCNN(),
        train,
        val,
        test,
        calib,
        epochs=60,
        lr=3e-3,
        weight_decay=1e-4,
        batch_size=32,
    )


RECIPES = {"mnist1d": mnist1d_recipe, "digits": digits_recipe}


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on float32 inputs ``x``, labels ``y``."""
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def fit_classifier(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    clip: float | None = None,
) -> float:
    """Train ``model`` in place with AdamW + one-cycle LR (and gradient-norm clipping at
    ``clip`` if given); keep the best-validation epoch. Returns the best validation accuracy."""
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    steps = (len(y) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    best_acc, best_state = -1.0, copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
        val_acc = accuracy(model, val.x, val.y)
        if val_acc >= best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return best_acc


def fit(r: Recipe) -> float:
    """Train one example recipe (:func:`fit_classifier`); returns its best validation accuracy."""
    return fit_classifier(
        r.model,
        r.train,
        r.val,
        epochs=r.epochs,
        lr=r.lr,
        weight_decay=r.weight_decay,
        batch_size=r.batch_size,
    )


def save(r: Recipe) -> tuple[Path, Path]:
    """Write the trained weights and the calibration/test data; return both paths."""
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    weights = WEIGHTS_DIR / f"{r.name}_cnn.safetensors"
    data = DATA_DIR / f"{r.name}.npz"
    save_file({k: v.detach().contiguous() for k, v in r.model.state_dict().items()}, str(weights))
    np.savez_compressed(data, calib_x=r.calib_x, test_x=r.test.x, test_y=r.test.y)
    return weights, data


def main(argv: list[str] | None = None) -> None:
    """Train the selected example models and report time and fp32 test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RECIPES), help="train only this model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in [args.only] if args.only else list(RECIPES):
        t0 = time.perf_counter()
        r = RECIPES[name]()
        t1 = time.perf_counter()
        val_acc = fit(r)
        t2 = time.perf_counter()
        test_acc = accuracy(r.model, r.test.x, r.test.y)
        weights, data = save(r)
        n_params = sum(p.numel() for p in r.model.parameters())
        print(
            f"{name}: {type(r.model).__name__}, {n_params} parameters, "
            f"data {t1 - t0:.1f} s, train {t2 - t1:.1f} s, "
            f"val acc {val_acc:.2%}, fp32 test acc {test_acc:.2%} "
            f"({len(r.test.y)} samples)"
        )
        print(
            f"  wrote {weights.relative_to(HERE.parent)} ({weights.stat().st_size} B), "
            f"{data.relative_to(HERE.parent)} ({data.stat().st_size} B)"
        )


if __name__ == "__main__":
    main()
