"""Patterns: parsing, visibility masks and visible-pair counts against closed forms."""

import pytest
import torch

from cab.patterns import (
    Pattern,
    attention_mask,
    cu_seqlens_from_segment_ids,
    segment_ids_from_cu_seqlens,
    segment_mask,
    segment_runs,
    validate_segment_ids,
    visibility_mask,
    visible_pairs,
)


def test_flags():
    assert [p.causal for p in Pattern] == [False, True, False, True]
    assert [p.cross for p in Pattern] == [False, False, True, True]


@pytest.mark.parametrize("text,expected", [("cs", Pattern.CS), ("causal self", Pattern.CS),
                                           ("Noncausal_Cross", Pattern.NC), (Pattern.CC, Pattern.CC)])
def test_parse(text, expected):
    assert Pattern.parse(text) is expected


def test_parse_suggests():
    with pytest.raises(ValueError, match="did you mean"):
        Pattern.parse("causal slef")
    assert Pattern.parse_many("NS, cs") == (Pattern.NS, Pattern.CS)
    assert Pattern.parse_many(None) == tuple(Pattern)


def test_causal_mask_is_lower_triangle_and_bottom_right_aligned():
    assert torch.equal(visibility_mask("CS", 5, 5), torch.ones(5, 5).tril().bool())
    # two new queries over a past of 6 keys: the last query sees everything, the first all but the last key
    m = visibility_mask("CS", 2, 6)
    assert m[1].all() and m[0].sum() == 5 and not m[0, 5]
    assert visibility_mask("CC", 3, 7).all() and visibility_mask("NC", 3, 7).all()


@pytest.mark.parametrize("lq,lk", [(1, 1), (7, 7), (64, 64), (3, 10)])
def test_visible_pairs_closed_forms(lq, lk):
    assert visible_pairs("NS", lq, lk) == lq * lk
    assert visible_pairs("CC", lq, lk) == lq * lk
    if lq == lk:
        assert visible_pairs("CS", lq, lk) == lq * (lq + 1) // 2
        assert visible_pairs("CS", lq, lk, convention="flash") == lq * lq // 2
    assert visible_pairs("CS", lq, lk) == int(visibility_mask("CS", lq, lk).sum())


def test_visible_pairs_with_padding_counts_each_row():
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True  # second element has 4 real keys
    assert visible_pairs("NC", 3, 6, pad) == 3 * 6 + 3 * 4
    mask = attention_mask("CS", 6, 6, pad)
    assert visible_pairs("CS", 6, 6, pad) == int(mask.expand(2, 1, 6, 6).sum()) == 21 + (1 + 2 + 3 + 4 * 3)


def test_segments_are_runs_of_equal_consecutive_ids():
    ids = torch.tensor([[7, 7, 2, 7, 7, 7], [0, 0, 0, 0, 0, 0]])
    assert segment_runs(ids).tolist() == [[0, 0, 1, 2, 2, 2], [0] * 6]
    mask = segment_mask(ids)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 0].tolist() == [True, True, False, False, False, False]  # the later 7s are another segment
    assert mask[1].all()
    cs = attention_mask("CS", 6, 6, None, segment_ids=ids)[0, 0]
    assert cs[4].tolist() == [False, False, False, True, True, False]


def test_cu_seqlens_round_trip():
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)  # an empty segment in the middle
    ids = segment_ids_from_cu_seqlens(cu)
    assert ids.tolist() == [[0, 0, 0, 2, 2, 2, 2, 2, 3]]
    assert cu_seqlens_from_segment_ids(ids).tolist() == [0, 3, 8, 9]  # empty segments have no run
    assert segment_ids_from_cu_seqlens(cu, length=11)[0, -2:].tolist() == [4, 4]  # the tail is one more segment
    assert cu_seqlens_from_segment_ids(torch.tensor([5, 5, 1, 5])).dtype == torch.int32
    with pytest.raises(ValueError):
        segment_ids_from_cu_seqlens(torch.tensor([1, 4]))


def test_segment_ids_are_validated():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert validate_segment_ids("NS", ids, 2, 5, 5).dtype == torch.int64
    for pattern, batch, lq, lk, bad in [("NC", 2, 5, 5, ids), ("CS", 2, 4, 5, ids), ("NS", 3, 5, 5, ids),
                                        ("NS", 2, 5, 5, ids.float()), ("NS", 2, 5, 5, ids[0])]:
        with pytest.raises(ValueError):
            validate_segment_ids(pattern, bad, batch, lq, lk)
