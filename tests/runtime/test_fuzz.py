"""Fuzzing the public API with hypothesis: arbitrary unicode text and mixed-type lists. Never a crash,
never a non-finite vector, the same bits as one-by-one, and a bad item named by its index."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stableembed import Encoder
from stableembed.runtime.verify import same_bits

FUZZ_EXAMPLES = 60

# Any code point but lone surrogates (those are a ValueError, tested below), including NUL, controls,
# combining marks, RTL, emoji and private use.
text_st = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@pytest.fixture(scope="module")
def enc(minilm_artifact):
    return Encoder(minilm_artifact, threads=1, check_hashes=False)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(text_st, min_size=1, max_size=8))
def test_arbitrary_text(enc, texts) -> None:
    out = enc.encode(texts, batch_size=3)
    assert out.shape == (len(texts), enc.dim) and np.isfinite(out).all()
    alone = np.stack([enc.encode(t) for t in texts])
    assert same_bits(out, alone).all()


junk_st = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=5), st.lists(st.text(max_size=3),
                    max_size=2), st.just(object()))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.one_of(text_st, junk_st), min_size=1, max_size=6))
def test_mixed_types_name_the_first_bad_index(enc, items) -> None:
    bad = [i for i, x in enumerate(items) if not isinstance(x, str)]
    if bad:
        with pytest.raises(TypeError, match=f"index {bad[0]} is {type(items[bad[0]]).__name__}"):
            enc.encode(items)
    else:
        assert np.isfinite(enc.encode(items)).all()
    assert np.isfinite(enc.encode(["still working"])).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.lists(text_st, max_size=4), surrogate=st.integers(0xD800, 0xDFFF))
def test_lone_surrogates_name_their_index(enc, prefix, surrogate) -> None:
    with pytest.raises(ValueError, match=f"index {len(prefix)} cannot be encoded as UTF-8"):
        enc.encode(prefix + [f"ab{chr(surrogate)}cd"])
