"""The sort-free selection of facekd.kernels.selection against a plain sort (torch.sort), on random,
tied and extreme inputs, in one process and across simulated ranks."""
import math

import pytest
import torch

from facekd.kernels.checks import class_bounds, run_ranks
from facekd.kernels.grouped_kd import reference_primary_mask
from facekd.kernels.selection import (NUM_PIVOTS, search, search_passes, sharded_primary_mask,
                                      whole_range)


def sorted_top(values, count):
    """[R, C] bool: the first ``count[r]`` classes of a stable descending sort (lower index first on ties)."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    positions = torch.arange(values.shape[1]).expand_as(values)
    return torch.zeros_like(values, dtype=torch.bool).scatter(1, order, positions < count[:, None])


def inputs(kind, rows, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * 10
    if kind == "tied":  # a handful of values, every one repeated, −0.0 beside +0.0
        values = torch.randint(-2, 3, (rows, num_classes), generator=generator).double()
        return torch.where(torch.rand(rows, num_classes, generator=generator) < 0.3, -values, values)
    # extreme: ±inf, the largest and smallest normal and subnormal doubles, values that differ
    # only below fp32 precision, ±0
    specials = torch.tensor([math.inf, -math.inf, 1.7e308, -1.7e308, 2.2e-308, 5e-324, -5e-324, 0.0, -0.0,
                             1.0, 1.0 + 2**-40, 1.0 - 2**-40], dtype=torch.float64)
    return specials[torch.randint(len(specials), (rows, num_classes), generator=generator)]


def masks_across_ranks(values, world, **options):
    bounds = class_bounds(values.shape[1], world)

    def rank_body(rank, all_reduce):
        a, b = bounds[rank]
        return sharded_primary_mask(values[:, a:b], torch.arange(a, b), num_classes=values.shape[1],
                                    all_reduce=all_reduce, **options)

    if world == 1:
        return rank_body(0, None)
    return torch.cat(run_ranks(world, rank_body), dim=1)


FIXED = dict(tau=0.93, temperature=1.0, selection="fixed", force_target=False, labels=None)


@pytest.mark.parametrize("kind", ["random", "tied", "extreme"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_fixed_k_is_the_top_of_a_stable_sort(kind, world, k):
    values = inputs(kind, 6, 41, seed=k)
    expected = sorted_top(values, torch.full((6,), min(k, 41)))
    assert torch.equal(masks_across_ranks(values, world, k=k, **FIXED), expected)


@pytest.mark.parametrize("kind", ["random", "tied"])
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("tau", [0.1, 0.5, 0.93, 0.999])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sample_selection_is_the_sorted_rule(kind, world, tau, temperature):
    # the reference sorts; its cumulative sums are rounded in another order, so the rare row whose
    # |cum_k − τ| ties to rounding may differ: these inputs have none
    values = inputs(kind, 5, 29, seed=int(tau * 1000))
    options = dict(tau=tau, temperature=temperature, selection="sample", k=None, force_target=False, labels=None)
    assert torch.equal(masks_across_ranks(values, world, **options), reference_primary_mask(values, **options))


@pytest.mark.parametrize("kind", ["random", "tied", "extreme"])
def test_forced_target_ranks_first(kind):
    values = inputs(kind, 6, 23, seed=3)
    labels = torch.tensor([0, 22, 11, 5, 5, 17])
    forced = values.masked_fill(torch.arange(23)[None, :] == labels[:, None], math.inf)
    options = dict(FIXED, k=4, force_target=True, labels=labels)
    assert torch.equal(masks_across_ranks(values, 2, **options), sorted_top(forced, torch.full((6,), 4)))


@pytest.mark.parametrize("count", [1, 2, 50, 99, 100])
def test_search_finds_the_count_th_key(count):
    # 100 distinct random keys per row in [0, 2^40): the count-th largest is the one key left in [lo, hi)
    generator = torch.Generator().manual_seed(count)
    keys = torch.randint(2**40, (4, 100), generator=generator)
    keys = torch.sort(keys, dim=1).values

    def evaluate(pivots, active):
        count_above = (keys[:, None, :] >= pivots[:, :, None]).sum(2).double()
        return count_above, torch.zeros_like(count_above)

    start = whole_range(2**40, 100, 0.0, 4, keys.device)
    interval = search(evaluate, start, search_passes(2**40), target_count=torch.full((4,), float(count)))
    expected = torch.sort(keys, dim=1, descending=True).values[:, count - 1]
    assert ((interval.lo <= expected) & (expected < interval.hi)).all()
    assert (interval.count_lo == count).all() and (interval.count_hi == count - 1).all()


def test_search_passes_cover_the_range():
    assert search_passes(1) == 0
    assert search_passes(NUM_PIVOTS + 1) == 1
    assert search_passes(NUM_PIVOTS + 2) == 2
    assert search_passes(2**32) == 8  # 17^7 < 2^32 ≤ 17^8
