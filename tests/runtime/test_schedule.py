"""Batch planning: every text exactly once, shapes hold their texts, fixed mode uses only the buckets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stableembed.export.artifact import default_buckets, parse_buckets
from stableembed.runtime.schedule import bucket_length, plan_dynamic, plan_fixed

lengths_st = st.lists(st.integers(2, 256), max_size=200)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, batch_size=st.integers(1, 70))
def test_dynamic_covers_each_text_once_padded_to_own_longest(lengths, batch_size) -> None:
    plan = plan_dynamic(lengths, batch_size)
    seen = [i for b in plan for i in b.indices]
    assert sorted(seen) == list(range(len(lengths)))
    for b in plan:
        assert 1 <= len(b.indices) <= batch_size and b.rows == len(b.indices)
        assert b.length == max(lengths[i] for i in b.indices)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st)
def test_fixed_uses_smallest_bucket_and_only_manifest_shapes(lengths) -> None:
    buckets = [tuple(b) for b in default_buckets(256)]
    plan = plan_fixed(lengths, buckets)
    assert sorted(i for b in plan for i in b.indices) == list(range(len(lengths)))
    bucket_lengths = sorted({t for _, t in buckets})
    for b in plan:
        assert (b.rows, b.length) in buckets and len(b.indices) <= b.rows
        for i in b.indices:
            assert b.length == min(t for t in bucket_lengths if t >= lengths[i])


def test_fixed_remainder_takes_smallest_batch_that_holds_it() -> None:
    plan = plan_fixed([10] * 41, [(1, 16), (8, 16), (32, 16)])
    assert [(b.rows, len(b.indices)) for b in plan] == [(32, 32), (32, 9)]
    plan = plan_fixed([10] * 7, [(1, 16), (8, 16), (32, 16)])
    assert [(b.rows, len(b.indices)) for b in plan] == [(8, 7)]


def test_errors() -> None:
    with pytest.raises(ValueError, match="fits no fixed bucket"):
        bucket_length(300, [16, 256])
    with pytest.raises(ValueError, match="batch_size"):
        plan_dynamic([3], 0)
    assert parse_buckets("8x16,32X128") == [[8, 16], [32, 128]]
    with pytest.raises(ValueError, match="BATCHxLENGTH"):
        parse_buckets("8by16")


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, batch_size=st.integers(1, 70), max_tokens=st.integers(1, 5000))
def test_dynamic_token_budget(lengths, batch_size, max_tokens) -> None:
    plan = plan_dynamic(lengths, batch_size, max_tokens)
    assert sorted(i for b in plan for i in b.indices) == list(range(len(lengths)))
    for b in plan:
        assert b.rows <= batch_size
        assert b.rows * b.length <= max_tokens or b.rows == 1  # a single text always runs


def test_default_buckets_follow_a_long_max_length() -> None:
    """An 8,192-token model gets buckets up to 8,192 tokens, and long lengths only at batches whose padded size
    stays within BUCKET_TOKENS (batch 1 always), so a fixed-mode long text never runs 32 rows of 8k."""
    from stableembed.export.artifact import BUCKET_TOKENS

    buckets = default_buckets(8192)
    lengths = sorted({t for _, t in buckets})
    assert lengths == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert all(b == 1 or b * t <= BUCKET_TOKENS for b, t in buckets)
    assert [b for b, t in buckets if t == 8192] == [1] and [b for b, t in buckets if t == 1024] == [1, 8]
    assert default_buckets(256) == [[b, t] for t in (16, 32, 64, 128, 256) for b in (1, 8, 32)]
    plan = plan_fixed([8000, 3, 900], [tuple(b) for b in buckets])
    assert {(b.rows, b.length) for b in plan} == {(1, 8192), (1, 16), (1, 1024)}


def test_fixed_buckets_must_reach_max_length_and_not_pass_it() -> None:
    from stableembed.runtime.schedule import check_buckets

    check_buckets([(8, 16), (1, 256)], 256)
    with pytest.raises(ValueError, match=r"must include the length max_length \(256\)"):
        check_buckets([(8, 16), (1, 128)], 256)
    with pytest.raises(ValueError, match=r"bucket length 512 is beyond max_length \(256\)"):
        check_buckets([(8, 16), (1, 256), (1, 512)], 256)
    for bad in ([(0, 256)], [(-4, 256)], [(8, 16), (0, 256)], [(8, 0), (1, 256)]):  # planning would never end
        with pytest.raises(ValueError, match="must have at least one row and one token"):
            check_buckets(bad, 256)
