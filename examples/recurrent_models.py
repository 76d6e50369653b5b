"""The recurrent example networks that ship with tinyrt: a word-level LSTM language model and
a GRU classifier for mnist1d.

Both trace with ``torch.fx.symbolic_trace`` and use only embedding, LSTM/GRU (batch-first,
zero initial state, outputs of every step), linear, dropout (WordLM) and flatten (Mnist1dGRU).
They return raw logits: any softmax belongs outside the model.

Import as a module (``from examples.recurrent_models import WordLM``) or by path
(``examples/recurrent_models.py:WordLM``). ``examples/train_recurrent.py`` trains both.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KJV_VOCAB_SIZE", "Mnist1dGRU", "WordLM"]

#: Vocabulary size of ``examples/data/kjv.npz`` (see ``examples/text.py``).
KJV_VOCAB_SIZE = 8350


class WordLM(nn.Module):
    """Word-level LSTM language model: token ids ``[N, T]`` to next-token logits ``[N, T, V]``.

    embedding -> dropout -> ``layers``-layer LSTM (batch-first, dropout between layers) ->
    dropout -> linear. The LSTM starts from a zero state on every call; to carry state across
    windows use ``self.lstm`` directly (as ``train_recurrent.py`` does).
    """

    def __init__(
        self,
        vocab_size: int = KJV_VOCAB_SIZE,
        embed: int = 512,
        hidden: int = 256,
        layers: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.dropout_in = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True, dropout=dropout)
        self.dropout_out = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, T, vocab_size]`` for int64 token ids ``[N, T]``."""
        x = self.dropout_in(self.embedding(tokens))
        out, _ = self.lstm(x)
        return self.fc(self.dropout_out(out))


class Mnist1dGRU(nn.Module):
    """GRU classifier for mnist1d: ``[N, 40, 1]`` sequences of scalars to ``[N, 10]`` logits.

    GRU (batch-first, zero initial state; the outputs of all 40 steps ``[N, 40, hidden]``) ->
    flatten ``[N, 40 * hidden]`` -> linear. Reading every step rather than only the last one
    keeps to ops the converter already has (flatten is a reshape) and scores slightly higher.
    """

    def __init__(
        self,
        hidden: int = 64,
        layers: int = 1,
        length: int = 40,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, layers, batch_first=True)
        self.fc = nn.Linear(length * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for signals ``[N, 40, 1]``."""
        out, _ = self.gru(x)
        out = torch.flatten(out, 1)
        return self.fc(out)
