"""Bucket sizes: powers of two, capped at the largest size there is."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from state.batch import bucket, buckets_up_to


@given(st.integers(1, 5000), st.integers(1, 64))
def test_bucket_is_the_smallest_power_of_two_at_least_n(n, minimum):
    b = bucket(n, minimum)
    assert b >= max(n, minimum) and b & (b - 1) == 0 and b < 2 * max(n, minimum)


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_a_capped_bucket_never_pads_past_the_cap(n, largest):
    b = bucket(n, largest=largest)
    assert b >= n
    assert b == min(bucket(n), max(largest, n))  # a size past the cap is not padded


@given(st.integers(1, 3000), st.booleans())
def test_every_bucket_a_size_can_get_is_listed(limit, capped):
    listed = buckets_up_to(limit, capped=capped)
    assert listed == sorted(set(listed))
    assert {bucket(n, largest=limit if capped else None) for n in range(1, limit + 1)} == set(listed)
