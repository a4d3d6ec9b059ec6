"""Deterministic train/valid/test split by dialogue (never by turn)."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Hashable, Sequence

from kokoro_helpers.data.convert import id_sort_key

SPLIT_NAMES = ("train", "valid", "test")


def split_sizes(n: int, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Sizes for n dialogues: valid and test rounded half up, train gets the rest
    (6,589 dialogues at 8:1:1 -> 5,271 / 659 / 659)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split_ratios must be three non-negative numbers (train, valid, test), got {list(ratios)}")
    total = float(sum(ratios))
    valid = math.floor(n * ratios[1] / total + 0.5)
    test = math.floor(n * ratios[2] / total + 0.5)
    return {"train": n - valid - test, "valid": valid, "test": test}


def split_ids(ids: Sequence, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 42,
              strata: dict | None = None) -> dict[str, list]:
    """Assign each dialogue id to train/valid/test.

    The result depends only on the set of ids, the ratios, the seed (and the strata): ids are
    sorted first, so input order never matters. With `strata` (id -> group, e.g. topic), every
    group is spread proportionally over the splits (systematic sampling) while the split sizes
    stay exactly those of `split_sizes`.
    """
    ordered = sorted(set(ids), key=id_sort_key)
    if len(ordered) != len(ids):
        raise ValueError("split_ids: dialogue ids must be unique")
    sizes = split_sizes(len(ordered), ratios)
    if strata is None:
        rng = random.Random(seed)
        rng.shuffle(ordered)
    else:
        groups: dict[Hashable, list] = defaultdict(list)
        for i in ordered:
            groups[strata.get(i)].append(i)
        keyed = []
        for name in sorted(groups, key=str):
            members = groups[name]
            rng = random.Random(f"{seed}:{name}")
            rng.shuffle(members)
            offset = rng.random()
            keyed += [((rank + offset) / len(members), str(name), m) for rank, m in enumerate(members)]
        keyed.sort(key=lambda t: (t[0], t[1]))
        ordered = [m for _, _, m in keyed]
    # valid and test first so that the small held-out splits take the earliest draws
    out = {"valid": ordered[:sizes["valid"]],
           "test": ordered[sizes["valid"]:sizes["valid"] + sizes["test"]],
           "train": ordered[sizes["valid"] + sizes["test"]:]}
    return {name: sorted(out[name], key=id_sort_key) for name in SPLIT_NAMES}
