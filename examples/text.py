"""Word-level English text for tinyrt's recurrent examples: the King James Bible from Debian.

The text comes, offline from everything but the Debian archive, from two Debian packages:
``bible-kjv`` (the ``bible`` program, 4.38 in bookworm) and ``bible-kjv-text`` (its data files
``/usr/lib/bible.data`` and ``/usr/lib/bible.data.conc``). Neither root nor an installation is
needed; :func:`kjv_text` runs, in a temporary directory::

    apt-get download bible-kjv bible-kjv-text
    dpkg-deb -x bible-kjv_*.deb root
    dpkg-deb -x bible-kjv-text_*.deb root
    root/usr/bin/bible -p root/usr/lib -l79 Genesis1:1-Revelation22:21

and keeps the standard output: 73,811 lines, 4,298,239 bytes (sha256 ``82fa5f37...``, see
:data:`KJV_SHA256`). ``-p`` replaces the program's data search path (``bible -p /nonexistent``
fails with "Cannot open data file"), ``-l79`` fixes the line width that otherwise follows
``$COLUMNS``. With ``use_installed=True`` an installed ``/usr/bin/bible`` is run instead.

The output holds, for each of the 1,189 chapters, a blank line, a header such as ``Genesis 1``
or ``1 Samuel 3``, a blank line and the verses, each as ``"  <n> <text>"`` wrapped over lines.
:func:`parse_chapters` joins the wrapped lines and drops headers and verse numbers (31,102
verses); :func:`tokenize` lower-cases a verse and splits it into words (with an inner
apostrophe: ``brother's``) and single punctuation characters; every verse ends with ``<eos>``.

Chapters are split deterministically by their index ``i`` (0 = Genesis 1, ..., 1188 =
Revelation 22): ``i % 20 == 0`` is test, ``i % 20 == 1`` validation, the rest training. The
vocabulary comes from the training split alone: ``<eos>`` (id 0), ``<unk>`` (id 1), then every
word seen at least twice, most frequent first, ties alphabetical.

Run ``python examples/text.py`` to write ``examples/data/kjv.npz``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "EOS",
    "KJV_SHA256",
    "UNK",
    "Chapter",
    "Corpus",
    "build_vocab",
    "encode",
    "kjv_corpus",
    "kjv_text",
    "parse_chapters",
    "split_of",
    "tokenize",
]

HERE = Path(__file__).resolve().parent
DATA_PATH = HERE / "data" / "kjv.npz"
PACKAGES = ("bible-kjv", "bible-kjv-text")
VERSE_SPEC = "Genesis1:1-Revelation22:21"
LINE_WIDTH = 79
KJV_SHA256 = "82fa5f3788c6a9a010fb128a0f0bf588984b5888a82058520620eded59b033ea"
EOS = "<eos>"
UNK = "<unk>"
MIN_COUNT = 2
SPLIT_PERIOD = 20
CALIB_SPANS = 16
CALIB_LEN = 256
SEED = 0

_HEADER = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]* \d+$")
_VERSE = re.compile(r"^\s+(\d+) (.*)$")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[^\sa-z]")


def _run_bible(bible: str, args: list[str]) -> str:
    """Run the ``bible`` program with ``args`` and return its standard output."""
    cmd = [bible, *args, f"-l{LINE_WIDTH}", VERSE_SPEC]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, encoding="utf-8")
    return result.stdout


def kjv_text(use_installed: bool = False, check: bool = True) -> str:
    """Return the whole King James Bible as printed by Debian's ``bible`` program.

    By default downloads (without root, without installing) ``bible-kjv`` and
    ``bible-kjv-text`` with ``apt-get download`` into a temporary directory, unpacks both
    with ``dpkg-deb -x`` and runs the unpacked ``usr/bin/bible -p <unpacked usr/lib> -l79
    Genesis1:1-Revelation22:21``. With ``use_installed=True`` runs ``/usr/bin/bible -l79 ...``
    (from ``apt-get install bible-kjv``) instead. With ``check`` the output must match
    :data:`KJV_SHA256`.
    """
    if use_installed:
        text = _run_bible("/usr/bin/bible", [])
    else:
        with tempfile.TemporaryDirectory(prefix="kjv-") as tmp:
            subprocess.run(
                ["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True
            )
            root = os.path.join(tmp, "root")
            for package in PACKAGES:
                (deb,) = glob.glob(os.path.join(tmp, f"{package}_*.deb"))
                subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
            text = _run_bible(
                os.path.join(root, "usr", "bin", "bible"), ["-p", os.path.join(root, "usr", "lib")]
            )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if check and digest != KJV_SHA256:
        raise RuntimeError(f"unexpected KJV text: sha256 {digest}, expected {KJV_SHA256}")
    return text


@dataclass(frozen=True)
class Chapter:
    """One chapter: its header (``"1 Samuel 3"``) and its verses without verse numbers."""

    header: str
    verses: tuple[str, ...]


def parse_chapters(text: str) -> list[Chapter]:
    """Split the ``bible`` output into chapters of verses.

    Wrapped lines are joined (runs of spaces collapsed), chapter headers and verse numbers
    dropped.
    Raises ``ValueError`` on anything unexpected (verse numbers out of order, stray lines).
    """
    chapters: list[Chapter] = []
    header: str | None = None
    verses: list[list[str]] = []

    def flush() -> None:
        if header is not None:
            chapters.append(Chapter(header, tuple(" ".join(" ".join(v).split()) for v in verses)))

    after_blank = True
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            after_blank = True
            continue
        verse = _VERSE.match(line)
        if after_blank and _HEADER.match(line):
            flush()
            header, verses = line, []
        elif verse:
            if header is None or int(verse.group(1)) != len(verses) + 1:
                raise ValueError(f"line {lineno}: verse out of order: {line!r}")
            verses.append([verse.group(2).strip()])
        elif verses and not after_blank:
            verses[-1].append(line.strip())
        else:
            raise ValueError(f"line {lineno}: text outside a verse: {line!r}")
        after_blank = False
    flush()
    return chapters


def tokenize(verse: str) -> list[str]:
    """Lower-case ``verse`` and split it into words and single punctuation characters."""
    return _TOKEN.findall(verse.lower())


def split_of(chapter_index: int) -> str:
    """``"test"``, ``"valid"`` or ``"train"`` for the chapter with this 0-based index."""
    r = chapter_index % SPLIT_PERIOD
    return "test" if r == 0 else "valid" if r == 1 else "train"


def build_vocab(tokens: list[str], min_count: int = MIN_COUNT) -> list[str]:
    """``[<eos>, <unk>]`` then the words seen ``min_count``+ times, by count then alphabet."""
    counts = Counter(t for t in tokens if t not in (EOS, UNK))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [EOS, UNK, *words]


def encode(tokens: list[str], vocab: list[str]) -> np.ndarray:
    """Token ids (int32) of ``tokens``; words outside ``vocab`` map to ``<unk>``."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    return np.array([index.get(t, unk) for t in tokens], dtype=np.int32)


@dataclass
class Corpus:
    """The tokenised splits (each verse followed by ``<eos>``) and the vocabulary."""

    vocab: list[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    chapters: dict[str, int]
    raw_tokens: dict[str, int]

    def calib_ids(self, spans: int = CALIB_SPANS, length: int = CALIB_LEN) -> np.ndarray:
        """``[spans, length]`` int32: consecutive training tokens from seeded random offsets."""
        rng = np.random.default_rng(SEED)
        starts = np.sort(rng.choice(len(self.train) - length, spans, replace=False))
        return np.stack([self.train[s : s + length] for s in starts]).astype(np.int32)


def kjv_corpus(text: str | None = None, use_installed: bool = False) -> Corpus:
    """Tokenise, split and encode the KJV (fetched with :func:`kjv_text` unless given)."""
    if text is None:
        text = kjv_text(use_installed=use_installed)
    chapters = parse_chapters(text)
    tokens: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    n_chapters = dict.fromkeys(tokens, 0)
    for i, chapter in enumerate(chapters):
        split = split_of(i)
        n_chapters[split] += 1
        for verse in chapter.verses:
            tokens[split].extend(tokenize(verse))
            tokens[split].append(EOS)
    vocab = build_vocab(tokens["train"])
    ids = {split: encode(toks, vocab) for split, toks in tokens.items()}
    return Corpus(
        vocab,
        ids["train"],
        ids["valid"],
        ids["test"],
        n_chapters,
        {split: len(toks) for split, toks in tokens.items()},
    )


def write_npz(corpus: Corpus, path: Path = DATA_PATH) -> Path:
    """Write ``vocab``, ``valid_ids``, ``test_ids`` and ``calib_ids`` (compressed) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        vocab=np.array(corpus.vocab, dtype=str),
        valid_ids=corpus.valid,
        test_ids=corpus.test,
        calib_ids=corpus.calib_ids(),
    )
    return path


def main(argv: list[str] | None = None) -> None:
    """Fetch the KJV, print statistics and write ``examples/data/kjv.npz``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--installed", action="store_true", help="run /usr/bin/bible instead of downloading"
    )
    parser.add_argument("--out", type=Path, default=DATA_PATH, help="npz to write")
    args = parser.parse_args(argv)
    corpus = kjv_corpus(use_installed=args.installed)
    unk = corpus.vocab.index(UNK)
    for split in ("train", "valid", "test"):
        ids = getattr(corpus, split)
        print(
            f"{split}: {corpus.chapters[split]} chapters, {len(ids)} tokens, "
            f"{(ids == unk).mean():.2%} <unk>"
        )
    print(f"vocabulary: {len(corpus.vocab)} entries (min count {MIN_COUNT} in train)")
    path = write_npz(corpus, args.out)
    print(f"wrote {path} ({path.stat().st_size} B)")


if __name__ == "__main__":
    main()
