"""Freivalds check of device products: correct products always pass, every kind of wrong product is caught
on exactly the rows it changed, the arithmetic is exact at the extremes, and s is fresh per instance."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from secureinfer.crypto import freivalds
from secureinfer.crypto.field import CHUNK, P, field_matmul
from secureinfer.crypto.freivalds import MAX_TERMS, FreivaldsCheck
from secureinfer.errors import IntegrityError

# (in, out, trials): small and odd shapes, SmolLM's projections, the inner-dimension limit, LM heads
SHAPES = [
    *((inn, out, 170) for inn, out in [(1, 1), (3, 7), (64, 64), (576, 1536), (1536, 576), (2048, 17)]),
    (576, 49152, 16),
    (2048, 49152, 4),
]
ROWS = 4  # rows per trial at most


def weight(gen: torch.Generator, inn: int, out: int) -> torch.Tensor:
    w = torch.randint(-127, 128, (inn, out), dtype=torch.int8, generator=gen)
    return w.masked_fill(w == 0, 1)  # a zero column would make some tampers (doubling, zeroing) no change at all


def field(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, P, shape, dtype=torch.int64, generator=gen)


@dataclass
class Case:
    check: FreivaldsCheck
    v: torch.Tensor  # [trials, ROWS, in]
    y: torch.Tensor  # [trials, ROWS, out], the correct products


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    """Every shape with its check (1 or 2 repetitions) and correct products, computed once in one GEMM each."""
    gen, out = torch.Generator().manual_seed(1), []
    for (inn, outf, trials), repetitions in zip(SHAPES, [1, 2] * len(SHAPES)):
        w = weight(gen, inn, outf)
        v = field(gen, trials, ROWS, inn)
        out.append(Case(FreivaldsCheck(w, repetitions), v, field_matmul(v.view(-1, inn), w).view(trials, ROWS, outf)))
    return out


@pytest.fixture(params=["compiled", "numpy"])
def batch_route(request, monkeypatch):
    """Run a batch test on the compiled check (128-bit sums, which builds here), then on the numpy limb route."""
    if request.param == "compiled":
        assert freivalds.build(freivalds.CHECK_KERNELS)[0] is not None, freivalds.build(freivalds.CHECK_KERNELS)[1]
    else:
        monkeypatch.setattr(freivalds, "build", lambda source: (None, "off"))
    return request.param


def test_correct_products_always_pass(cases):
    trials = 0
    for case in cases:
        for t in range(len(case.v)):
            rows = 1 + t % ROWS
            assert case.check.verify(case.v[t, :rows], case.y[t, :rows])
            case.check.check(case.v[t, :rows], case.y[t, :rows], "w")
            trials += 1
    assert trials >= 1000
    gen = torch.Generator().manual_seed(2)
    v = field(gen, 2, 3, 64)  # leading batch dimensions are kept
    w = weight(gen, 64, 8)
    assert FreivaldsCheck(w).verify_rows(v, field_matmul(v, w)).tolist() == [[True] * 3] * 2


def tampered(mode: str, y: torch.Tensor, other_y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    bad = y.clone()
    if mode == "plus one":
        row, col = (int(torch.randint(n, (1,), generator=gen)) for n in y.shape)
        bad[row, col] = (bad[row, col] + 1) % P
    elif mode == "doubled":
        bad = bad * 2 % P
    elif mode == "replayed":
        bad = other_y.clone()  # the correct product of another input
    elif mode == "rows swapped":
        bad = bad[[1, 0, *range(2, len(bad))]]
    elif mode == "zero":
        bad.zero_()
    return bad


@pytest.mark.parametrize("mode", ["plus one", "doubled", "replayed", "rows swapped", "zero"])
def test_wrong_products_are_always_caught_on_exactly_the_wrong_rows(cases, mode):
    gen, trials = torch.Generator().manual_seed(3), 0
    for case in cases:
        count = len(case.v)
        for t in range(max(1, count // 3)):
            rows = 2 + t % (ROWS - 1)
            v, y = case.v[t, :rows], case.y[t, :rows]
            bad = tampered(mode, y, case.y[(t + 1) % count, :rows], gen)
            wrong = (bad != y).any(dim=1)
            assert wrong.any(), "the tamper must change the product for the trial to mean anything"
            assert torch.equal(case.check.verify_rows(v, bad), ~wrong)
            assert not case.check.verify(v, bad)
            trials += 1
    assert trials >= 200  # five modes: over 1000 tampered products in all, each miss has probability <= 2^-35


def test_check_names_the_weight_and_the_fix():
    gen = torch.Generator().manual_seed(3)
    w = weight(gen, 16, 8)
    v = field(gen, 3, 16)
    y = field_matmul(v, w)
    y[1, 2] = (y[1, 2] + 1) % P
    with pytest.raises(IntegrityError, match=r"wrong product for layers\.3\.mlp\.up .*1 of 3 rows") as err:
        FreivaldsCheck(w).check(v, y, "layers.3.mlp.up")
    assert "restart the device" in err.value.fix


def test_malformed_device_results_fail():
    gen = torch.Generator().manual_seed(4)
    w = weight(gen, 16, 8)
    check = FreivaldsCheck(w)
    v = field(gen, 3, 16)
    y = field_matmul(v, w)
    congruent = y.clone()
    congruent[0, 0] += P  # same residue, but not a reduced field element
    negative = y.clone()
    negative[2, 1] -= P
    assert check.verify_rows(v, congruent).tolist() == [False, True, True]
    assert check.verify_rows(v, negative).tolist() == [True, True, False]
    for wrong in (y.to(torch.int32), y.double(), y[:2], y[:, :7], y.view(3, 2, 4)):
        assert check.verify_rows(v, wrong).tolist() == [False] * 3
    zero_v, unreduced_zero = torch.zeros(1, 16, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64)
    unreduced_zero[0, 3] = P  # P = 0 mod P is the right product of v = 0, but not in [0, P)
    assert check.verify_rows(zero_v, unreduced_zero).tolist() == [False]


def test_limits_and_misuse_are_refused():
    with pytest.raises(ValueError, match="proven exact"):
        FreivaldsCheck(torch.zeros(MAX_TERMS, 1, dtype=torch.int8))
    with pytest.raises(ValueError, match="proven exact"):
        FreivaldsCheck(torch.zeros(1, MAX_TERMS, dtype=torch.int8))
    with pytest.raises(ValueError, match="repetitions"):
        FreivaldsCheck(torch.zeros(2, 2, dtype=torch.int8), 0)
    with pytest.raises(ValueError, match="int8"):
        FreivaldsCheck(torch.zeros(2, 2))
    check = FreivaldsCheck(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, P\)"):
        check.verify(torch.tensor([[0, P]]), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        check.verify(torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))


def recording_uniform_field(monkeypatch, fill: int | None = None) -> list[torch.Tensor]:
    """Records every s the check draws; with `fill`, draws that constant instead of random elements."""
    draws, original = [], freivalds.uniform_field

    def draw(rows: int, cols: int) -> torch.Tensor:
        draws.append(original(rows, cols) if fill is None else torch.full((rows, cols), fill, dtype=torch.int64))
        return draws[-1]

    monkeypatch.setattr(freivalds, "uniform_field", draw)
    return draws


def project(y: list[list[int]], v: list[list[int]], check: FreivaldsCheck) -> list[list[int]]:
    """The check's (y s - v W s) mod P for each row and repetition, as Python integers."""
    return freivalds._project([np.array(y, dtype=np.int64), np.array(v, dtype=np.int64)], check._limbs_t).tolist()


def test_projections_match_python_integers(monkeypatch):
    draws = recording_uniform_field(monkeypatch)
    rng = random.Random(5)
    w = [[rng.randrange(-127, 128) for _ in range(4)] for _ in range(5)]
    check = FreivaldsCheck(torch.tensor(w, dtype=torch.int8), repetitions=3)
    (s,) = (d.tolist() for d in draws)
    ws = [[sum(w[i][j] * s[j][c] for j in range(4)) for c in range(3)] for i in range(5)]
    v = [[rng.randrange(P) for _ in range(5)] for _ in range(6)]
    y = [[rng.randrange(P) for _ in range(4)] for _ in range(6)]
    expected = [
        [(sum(yr[j] * s[j][c] for j in range(4)) - sum(vr[i] * ws[i][c] for i in range(5))) % P for c in range(3)]
        for yr, vr in zip(y, v)
    ]
    assert project(y, v, check) == expected


def test_arithmetic_is_exact_at_the_extremes(monkeypatch):
    """Every operand at its largest: s, v and y all P - 1, W all +-127, in + out = 2^17; then a product wider than
    one of the field's slices."""
    recording_uniform_field(monkeypatch, fill=P - 1)
    out = MAX_TERMS - 3
    rows = [[127] * out, [-127] * out, [(-1) ** j * 127 for j in range(out)]]
    check = FreivaldsCheck(torch.tensor(rows, dtype=torch.int8), repetitions=2)
    ws = [sum(row) * (P - 1) for row in rows]
    expected = (out * (P - 1) * (P - 1) - sum((P - 1) * x for x in ws)) % P
    assert project([[P - 1] * out] * 2, [[P - 1] * 3] * 2, check) == [[expected] * 2] * 2

    inner = 3 * CHUNK
    w = torch.tensor([[127, -127, 127, -127, (-1) ** i * 127] for i in range(inner)], dtype=torch.int8)
    check = FreivaldsCheck(w)
    v = torch.full((1, inner), P - 1)
    y = field_matmul(v, w)
    assert y.tolist() == [[(P - 1) * sum(int(x) for x in w[:, j]) % P for j in range(5)]]
    assert check.verify(v, y)
    assert not check.verify(v, torch.full((1, 5), P - 1))


def test_s_is_fresh_for_every_instance(monkeypatch):
    draws = recording_uniform_field(monkeypatch)
    w = torch.ones(8, 32, dtype=torch.int8)
    first, second = FreivaldsCheck(w, 2), FreivaldsCheck(w, 2)
    assert [tuple(d.shape) for d in draws] == [(32, 2), (32, 2)]
    assert not torch.equal(draws[0], draws[1])
    assert not np.array_equal(first._limbs_t, second._limbs_t)


def test_cost_accounting():
    check = FreivaldsCheck(torch.zeros(576, 1536, dtype=torch.int8), repetitions=2)
    assert check.macs(3) == 3 * (576 + 1536) * 2
    assert check.nbytes == (576 + 1536) * 2 * 8 + (576 + 1536) * 2 * 2 * 8  # s and W s, then their limbs


def test_a_batch_passes_exactly_when_every_product_in_it_is_right(cases, batch_route):
    """verify_products over products of different weights and widths: right ones pass together; one wrong
    element anywhere, a wrong dtype, shape or an unreduced value fails the batch (the runtime then names it)."""
    gen = torch.Generator().manual_seed(7)
    batch = [(case.check, case.v[0, :1], case.y[0, :1]) for case in cases[:6]]  # one row each, as in decode
    assert freivalds.verify_products(batch)
    for index in range(len(batch)):
        check, v, y = batch[index]
        spot = int(torch.randint(0, y.shape[-1], (1,), generator=gen))
        wrong = y.clone()
        wrong[0, spot] = (wrong[0, spot] + 1 + int(torch.randint(0, P - 1, (1,), generator=gen))) % P
        for bad in (wrong, y.to(torch.int32), y[:, :-1] if y.shape[-1] > 1 else y.repeat(1, 2), y + P):
            assert not freivalds.verify_products(batch[:index] + [(check, v, bad)] + batch[index + 1 :])
            assert not check.verify(v, bad)  # and its own check, on the same secret s, fails too


def test_a_batch_splits_where_rows_differ_or_terms_run_out(cases, monkeypatch, batch_route):
    """A prefill's products and its one-row LM head go in separate groups, and so do products past MAX_TERMS
    together: each group still catches a wrong product in it."""
    prefill = [(case.check, case.v[0], case.y[0]) for case in cases[:4]]  # ROWS rows each
    head = [(cases[6].check, cases[6].v[0, :1], cases[6].y[0, :1])]
    assert freivalds.verify_products(prefill + head)
    wrong_head = head[0][2].clone()
    wrong_head[0, -1] = (wrong_head[0, -1] + 1) % P
    assert not freivalds.verify_products(prefill + [(head[0][0], head[0][1], wrong_head)])
    widest = max(case.check.in_features + case.check.out_features for case in cases[:4])
    monkeypatch.setattr(freivalds, "MAX_TERMS", widest)  # every product its own group
    assert freivalds.verify_products(prefill)
    check, v, y = prefill[-1]
    assert not freivalds.verify_products(prefill[:-1] + [(check, v, (y + 1) % P)])


def test_a_batch_is_exact_with_every_term_at_its_largest(monkeypatch, batch_route):
    """Two products whose in + out add up to MAX_TERMS, with s, v and W at their largest: the summed limb
    products reach their bound and the right products still pass, exactly."""
    recording_uniform_field(monkeypatch, fill=P - 1)
    half = MAX_TERMS // 2
    batch = []
    for sign in (1, -1):
        w = torch.full((half - 1, 1), 127 * sign, dtype=torch.int8)
        v = torch.full((1, half - 1), P - 1)
        batch.append((FreivaldsCheck(w, repetitions=2), v, field_matmul(v, w)))
    assert sum(c.in_features + c.out_features for c, _, _ in batch) == MAX_TERMS
    assert freivalds.verify_products(batch)
    assert not freivalds.verify_products([batch[0], (batch[1][0], batch[1][1], (batch[1][2] + 1) % P)])
    with pytest.raises(ValueError, match="field elements"):  # a v outside [0, P) is the caller's bug, either route
        freivalds.verify_products([(batch[0][0], batch[0][1] + 1, batch[0][2])])
