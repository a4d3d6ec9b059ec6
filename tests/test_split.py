"""Train/valid/test split by dialogue: sizes, determinism, disjointness, stratification."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from kokoro_helpers.data.schema import TOPICS
from kokoro_helpers.data.split import SPLIT_NAMES, split_ids, split_sizes

# the corpus's ids: 6,589 of 4..7234 (with gaps), reproduced deterministically
CORPUS_IDS = sorted(random.Random(0).sample(range(4, 7235), 6589))


def test_full_corpus_sizes_are_5271_659_659():
    assert split_sizes(6589) == {"train": 5271, "valid": 659, "test": 659}
    assert split_sizes(6589, (8, 1, 1)) == {"train": 5271, "valid": 659, "test": 659}
    # valid and test are rounded half up
    assert split_sizes(5) == {"train": 3, "valid": 1, "test": 1}
    assert split_sizes(25) == {"train": 19, "valid": 3, "test": 3}
    assert split_sizes(49) == {"train": 39, "valid": 5, "test": 5}


@pytest.mark.parametrize("n", [0, 1, 2, 3, 9, 10, 11, 49, 118, 999, 6589])
@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.9, 0.05, 0.05), (0.7, 0.2, 0.1), (1, 0, 0)])
def test_sizes_add_up(n, ratios):
    sizes = split_sizes(n, ratios)
    assert sum(sizes.values()) == n and min(sizes.values()) >= 0
    total = sum(ratios)
    for name, r in zip(SPLIT_NAMES[1:], ratios[1:]):
        assert abs(sizes[name] - n * r / total) <= 0.5


@pytest.mark.parametrize("ratios", [(0.8, 0.2), (0.8, -0.1, 0.3), (0, 0, 0)])
def test_bad_ratios_raise(ratios):
    with pytest.raises(ValueError, match="split_ratios"):
        split_sizes(100, ratios)


def _check_partition(splits, ids):
    seen = [i for name in SPLIT_NAMES for i in splits[name]]
    assert len(seen) == len(set(seen)), "an id is in two splits"
    assert set(seen) == set(ids)


def test_full_corpus_split_is_a_partition_of_exact_sizes():
    splits = split_ids(CORPUS_IDS, (0.8, 0.1, 0.1), seed=42)
    assert {n: len(v) for n, v in splits.items()} == {"train": 5271, "valid": 659, "test": 659}
    _check_partition(splits, CORPUS_IDS)
    assert all(splits[n] == sorted(splits[n]) for n in SPLIT_NAMES)


def test_split_is_deterministic_and_seed_dependent():
    a = split_ids(CORPUS_IDS, seed=42)
    assert split_ids(list(CORPUS_IDS), seed=42) == a
    b = split_ids(CORPUS_IDS, seed=43)
    assert b != a and set(b["test"]) != set(a["test"])
    _check_partition(b, CORPUS_IDS)


def test_split_is_independent_of_input_order():
    ids = CORPUS_IDS[:500] + ["file-b", "file-a", "sha1:0123456789abcdef"]
    reference = split_ids(ids, seed=7)
    for s in range(3):
        shuffled = list(ids)
        random.Random(s).shuffle(shuffled)
        assert split_ids(shuffled, seed=7) == reference
        assert split_ids(tuple(reversed(shuffled)), seed=7) == reference
    _check_partition(reference, ids)


def test_duplicate_ids_raise():
    with pytest.raises(ValueError, match="unique"):
        split_ids([1, 2, 2, 3])


def _corpus_strata(ids):
    """Topics in the corpus's proportions (TOPICS' counts), assigned deterministically."""
    names = [t for t, (_, n) in TOPICS.items() for _ in range(n)]
    rng = random.Random(1)
    return {i: rng.choice(names) for i in ids}


def test_stratified_split_keeps_exact_sizes_and_spreads_each_topic():
    strata = _corpus_strata(CORPUS_IDS)
    splits = split_ids(CORPUS_IDS, seed=42, strata=strata)
    assert {n: len(v) for n, v in splits.items()} == split_sizes(len(CORPUS_IDS))
    _check_partition(splits, CORPUS_IDS)
    per_topic = Counter(strata.values())
    for name, ratio in zip(SPLIT_NAMES, (0.8, 0.1, 0.1)):
        got = Counter(strata[i] for i in splits[name])
        for topic, n in per_topic.items():
            assert abs(got[topic] - n * ratio) <= 2, (name, topic, got[topic], n * ratio)
    # a random split is usually much less even on the big topics: stratification did something
    plain = split_ids(CORPUS_IDS, seed=42)
    dev_strat = sum(abs(Counter(strata[i] for i in splits["test"])[t] - n * 0.1) for t, n in per_topic.items())
    dev_plain = sum(abs(Counter(strata[i] for i in plain["test"])[t] - n * 0.1) for t, n in per_topic.items())
    assert dev_strat < dev_plain


def test_stratified_split_is_deterministic_and_order_independent():
    ids = CORPUS_IDS[:300]
    strata = _corpus_strata(ids)
    reference = split_ids(ids, seed=5, strata=strata)
    shuffled = list(ids)
    random.Random(9).shuffle(shuffled)
    assert split_ids(shuffled, seed=5, strata=dict(reversed(list(strata.items())))) == reference
    assert split_ids(ids, seed=6, strata=strata) != reference
    _check_partition(reference, ids)


def test_small_topics_with_missing_stratum_are_still_split():
    ids = list(range(1, 50))
    strata = {i: ("Others" if i % 7 == 0 else None) for i in ids}    # None: no topic
    splits = split_ids(ids, seed=42, strata=strata)
    assert {n: len(v) for n, v in splits.items()} == split_sizes(49)
    _check_partition(splits, ids)
