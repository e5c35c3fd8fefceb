"""CTC helpers: greedy decoding, edit distance, and the character list of a PaddleOCR recogniser.

Greedy decoding: the argmax class per time step; repeats collapse into one; then the blank (index 0) is dropped,
so "a a - a" reads "aa" while "a a a" reads "a". Index i > 0 is the character characters[i - 1].
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import ModelError

BLANK = 0


def ctc_greedy_decode(scores: np.ndarray, blank: int = BLANK) -> list[tuple[int, ...]]:
    """[N, T, C] scores (logits or probabilities) -> one tuple of class indices per sequence."""
    idx = np.asarray(scores).argmax(axis=-1)
    first = np.ones((idx.shape[0], min(idx.shape[1], 1)), bool)
    keep = (idx != blank) & np.concatenate([first, idx[:, 1:] != idx[:, :-1]], axis=1)
    return [tuple(int(c) for c in row[k]) for row, k in zip(idx, keep)]


def ctc_text(sequence, characters: list[str]) -> str:
    """Class indices -> text: index i > 0 is characters[i - 1]; an index outside the list reads U+FFFD."""
    return "".join(characters[i - 1] if 0 < i <= len(characters) else "\ufffd" for i in sequence)


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions cost 1)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def similarity(a, b) -> float:
    """1 - edit distance / max(len(a), len(b), 1): PaddleOCR's norm_edit_dis, in [0, 1]."""
    return 1.0 - edit_distance(a, b) / max(len(a), len(b), 1)


def ctc_characters(metadata_text: str, num_classes: int) -> list[str]:
    """The characters of a CTC head of `num_classes` classes from PaddleOCR's `character` metadata: one character
    per line (or a JSON list). Index 0 is the blank, so the list holds num_classes - 1 characters; a list two short
    lacks the space that Paddle appends as the last class with use_space_char, and gets it."""
    try:
        value = json.loads(metadata_text)
    except ValueError:
        value = None
    if isinstance(value, list):
        chars = [str(v) for v in value]
    else:
        chars = [line.removesuffix("\r") for line in metadata_text.split("\n")]
        if chars and chars[-1] == "":
            chars.pop()  # the final newline
    if len(chars) == num_classes - 2:
        chars.append(" ")
    if len(chars) != num_classes - 1:
        raise ModelError(f"the model's character list has {len(chars)} entries but its CTC output has {num_classes} "
                         f"classes: expected {num_classes - 1} (the blank is class 0), or {num_classes - 2} plus "
                         "the space Paddle appends")
    return chars
