"""The two example networks that ship with tinyrt.

Both use only layers the converter supports (convolutions, linear, batch norm, ReLU/ReLU6,
pooling, dropout, flatten, residual ``+``) and trace with ``torch.fx.symbolic_trace``. They
return raw logits: any softmax belongs outside the model.

Import as a module (``from examples.models import DigitsCNN``) or by path
(``examples/models.py:DigitsCNN``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "Mnist1dCNN"]


def _conv1d_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv1d (no bias, "same"-style padding) followed by BatchNorm1d."""
    return nn.Sequential(
        nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(cout),
    )


class Mnist1dCNN(nn.Module):
    """Residual 1-D CNN for mnist1d: ``[N, 1, 40]`` signals to ``[N, 10]`` logits.

    stem (conv k5 s2) -> residual down-sampling block (conv k3 s2 + conv k3 | conv k1 s2,
    summed) -> conv k3 s2 -> dropout -> flatten -> linear. Lengths 40 -> 20 -> 10 -> 5.
    """

    def __init__(self, channels: int = 32, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(_conv1d_bn(1, c, 5, 2), nn.ReLU())
        self.body = nn.Sequential(_conv1d_bn(c, c, 3, 2), nn.ReLU(), _conv1d_bn(c, c, 3, 1))
        self.shortcut = _conv1d_bn(c, c, 1, 2)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(_conv1d_bn(c, c, 3, 2), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for signals ``[N, 1, 40]``."""
        x = self.stem(x)
        y = self.body(x)
        x = self.shortcut(x)
        x = self.relu(x + y)
        x = self.head(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class DigitsCNN(nn.Module):
    """Small 2-D CNN for scikit-learn digits: ``[N, 1, 8, 8]`` in [0, 1] to ``[N, 10]`` logits.

    conv 3x3 -> depthwise conv 3x3 (ReLU6) -> pointwise conv 1x1 -> max pool -> conv 3x3 ->
    max pool -> dropout -> flatten -> linear. Spatial size 8 -> 8 -> 8 -> 4 -> 4 -> 2.
    """

    def __init__(self, channels: int = 16, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU6(),
            nn.Conv2d(c, 2 * c, 1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * c * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``[N, 1, 8, 8]``."""
        x = self.features(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        return self.fc(x)
