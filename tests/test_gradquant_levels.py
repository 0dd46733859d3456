"""ALQ/AMQ levels for quantized gradient exchange (mpqflow/levels/fit.py) against the quantizer that uses them.

What this file shows (tests/test_quant_levels.py and tests/test_gradquant.py cover the closed form
against quadrature, adaptive-beats-uniform, ALQ stationarity, AMQ's derivative at a few p, and
unbiasedness; nothing here repeats them):

1. The closed-form expected variance Psi(l) = E[(l_{j+1} - r)(r - l_j)], r ~ a fitted truncated
   normal (single fit and per-bucket mixture), is the variance the real wire path produces:
   r drawn from the fitted distribution (sampled with scipy's ndtri, not with the module's ppf) is
   sent through encode -> pack -> unpack -> decode, and the mean of (Q(r) - r)^2 agrees with Psi
   within 4 standard errors, for uniform, exponential (p = 1/2), ALQ and AMQ levels at 2, 3, 4 bits.
2. ALQ's exact coordinate descent (`_cd_sweep`) never raises Psi (up to the rounding error of
   evaluating Psi), from uniform, exponential and random starts, on a truncated normal and on a
   mixture; ALQ reaches the brute-force optimum for 1 and 2 interior levels and beats uniform
   levels by more than 5x on N(0, 0.1^2) truncated to [0, 1].
3. AMQ's dPsi/dp equals central finite differences over a grid of p and n, and it contains the
   central interval [0, l_1] = [0, p^(n-2)] (with the sign: (-l_1, l_1)): the derivative without it
   (built here from dist.moments) is far off, and minimizing Psi without it (as the reference
   learning-to-quantize code's candidate scoring does) picks a p with several times the full Psi.
4. Coordinate descent on a distribution without mass near 1 (32 levels on N(0, 0.1^2)) keeps the
   top level exactly 1 (a regression: `_strict` used to lift it to 1 + 9e-13, which every later
   use of the levels rejects), and `_strict` keeps 0 = l_0 < ... < l_{n-1} = 1 with gaps >= eps on
   adversarial inputs.
"""

import numpy as np
import pytest
import torch
from scipy import optimize, special

from mpqflow.comm.codes import decode, encode, pack_codes, unpack_codes
from mpqflow.levels.fit import (
    TruncNormMixture,
    _cd_sweep,
    _strict,
    alq_levels,
    amq_levels,
    amq_variance_and_grad,
    expected_variance,
    exponential_levels,
    fit_truncnorm,
    levels_for_bits,
    uniform_levels,
)

EPS = np.finfo(np.float64).eps
TRUNC_NORMAL = TruncNormMixture(np.array([0.0]), np.array([0.1]), np.array([1.0]))  # N(0, 0.1^2) on [0, 1]
MIXTURE = TruncNormMixture(np.array([0.02, 0.3, 0.7]), np.array([0.01, 0.1, 0.05]), np.array([0.6, 0.3, 0.1]))


def _gradient_like(numel=2**16, bucket=1024, seed=0):
    """A flat 'gradient': buckets of Student-t entries, alternately heavy (df 2) and light (df 30)
    tailed, each bucket at its own scale exp(N(0, 1)) (layers of different magnitude)."""
    rng = np.random.default_rng(seed)
    buckets = numel // bucket
    df = np.where(np.arange(buckets) % 2 == 0, 2.0, 30.0)[:, None]
    t = rng.standard_t(df, size=(buckets, bucket)) * np.exp(rng.normal(size=(buckets, 1)))
    return torch.from_numpy(t.reshape(-1)).float()


def _sample(dist: TruncNormMixture, size: int, rng: np.random.Generator) -> np.ndarray:
    """r ~ dist by picking a component by weight and inverting its truncated normal CDF with scipy
    (independent of the module's cdf/ppf)."""
    k = rng.choice(dist.mu.size, size=size, p=dist.weight)
    mu, s = dist.mu[k], dist.sigma[k]
    lo, hi = special.ndtr(-mu / s), special.ndtr((1 - mu) / s)
    return np.clip(mu + s * special.ndtri(lo + rng.uniform(size=size) * (hi - lo)), 0.0, 1.0)


def _roundoff(lv, dist) -> float:
    """A bound on the rounding error of evaluating Psi(lv): eps times the sum of the magnitudes of
    the terms -m2 + (l_j + l_{j+1}) m1 - l_j l_{j+1} m0 that cancel in it."""
    lo, hi = lv[:-1], lv[1:]
    m0, m1, m2 = dist.moments(lo, hi)
    return EPS * float(np.sum(np.abs(m2) + (lo + hi) * np.abs(m1) + lo * hi * np.abs(m0)))


# ---------------------------------------------------------------- 1. closed form = the quantizer's variance


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("mixture", [False, True], ids=["single", "mixture"])
def test_closed_form_variance_is_the_empirical_variance_of_encode_decode(norm, mixture):
    """Each bucket holds one coordinate equal to 1 and 1023 signed draws r ~ dist, so with linf
    normalization the quantizer sees exactly r. Over 1023 x 1024 draws, mean (Q(r) - r)^2 is within
    4 standard errors of expected_variance (measured |z| <= 1.5). The standard error is that of the
    mean under unbiased rounding, from the exact conditional moments of (Q - r)^2 given the drawn r:
    the sample's own std underestimates it badly when, as for ALQ at 4 bits with L2 buckets, 4 % of
    Psi comes from the few r in the top interval [0.11, 1] that round up to 1 (a handful in 10^6
    draws; with the sample std one draw gave z = -23). It is 0.1-2.7 % of Psi (2.7 %: that case)."""
    dist = fit_truncnorm(_gradient_like(), 1024, norm=norm, mixture=mixture)
    assert dist.mu.size == (64 if mixture else 1)
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(2)
    d, buckets = 1024, 1024
    r = _sample(dist, buckets * (d - 1), rng).reshape(buckets, d - 1)
    signs = np.where(rng.uniform(size=r.shape) < 0.5, -1.0, 1.0)
    v = torch.from_numpy(np.concatenate([np.ones((buckets, 1)), signs * r], axis=1).reshape(-1)).float()
    keep = torch.ones(buckets, d, dtype=torch.bool)
    keep[:, 0] = False  # the sentinels (r = 1 exactly, a level) are not measured
    keep = keep.reshape(-1)
    truth = v.double()[keep]
    r_seen = truth.abs()  # what the quantizer rounds (float32 draws)
    for bits in (2, 3, 4):
        n = levels_for_bits(bits)
        candidates = {
            "uniform": uniform_levels(n),
            "exp(1/2)": exponential_levels(n, 0.5),
            "alq": alq_levels(dist, n),
            "amq": amq_levels(dist, n)[0],
        }
        if bits == 2:  # two magnitude levels: every method has (0, 1), ternary {-1, 0, 1} x norm
            assert all(
                torch.equal(lv.double(), torch.tensor([0.0, 1.0], dtype=torch.float64)) for lv in candidates.values()
            )
            candidates = {"all (0, 1)": candidates["uniform"]}
        for name, lv in candidates.items():
            codes, norms = encode(v, lv, d, gen, norm="linf")
            assert torch.equal(norms, torch.ones(buckets))
            back = unpack_codes(pack_codes(codes, bits), bits, codes.numel())
            q = decode(back, norms, lv, d).double()
            err2 = (q[keep] - truth) ** 2
            emp, psi = float(err2.mean()), expected_variance(lv, dist)
            # standard error of emp under unbiased rounding, from the exact conditional moments of
            # e = (Q - r)^2 given r: E[e|r] = (h - r)(r - l), E[e^2|r] = E[e|r] ((h - r)^3 + (r - l)^3) / (h - l)
            lvd = torch.as_tensor(lv, dtype=torch.float64)
            j = torch.clamp(torch.searchsorted(lvd, r_seen, right=True) - 1, 0, n - 2)
            lo, hi = lvd[j], lvd[j + 1]
            e1 = (hi - r_seen) * (r_seen - lo)
            e2 = e1 * ((hi - r_seen) ** 3 + (r_seen - lo) ** 3) / (hi - lo)
            se = float(e2.mean() - e1.mean() ** 2) ** 0.5 / err2.numel() ** 0.5
            z = (emp - psi) / se
            print(f"{norm} {'mixture' if mixture else 'single'} {bits} bits {name}: Psi {psi:.6g} empirical "
                  f"{emp:.6g} (rel {emp / psi - 1:+.2%}, z {z:+.2f}, SE {se / psi:.2%} of Psi)")  # fmt: skip
            assert abs(z) < 4, (bits, name, psi, emp, se)
            assert se < 0.03 * psi  # measured 0.1-2.7 %, see the docstring


# ---------------------------------------------------------------- 2. ALQ coordinate descent


def _starts(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    starts = {"uniform": uniform_levels(n).numpy(), "exp(1/2)": exponential_levels(n, 0.5).numpy()}
    for s in range(3):
        starts[f"random{s}"] = np.concatenate([[0.0], np.sort(rng.uniform(size=n - 2)), [1.0]])
    return starts


@pytest.mark.parametrize("dist", [TRUNC_NORMAL, MIXTURE], ids=["truncnorm", "mixture"])
def test_cd_sweeps_never_increase_the_expected_variance(dist):
    """25 sweeps from 5 starts, n = 3, 4, 8, 16 levels: every sweep has Psi_new <= Psi_old + 16 x the
    rounding bound of evaluating Psi (the largest increase seen is 4.0 x that bound, 1.7e-14
    relative, once converged: a fixed 1e-15 relative slack would fail on rounding); every first
    sweep lowers Psi by at least 1 % (measured >= 4.9 %). The converged ALQ levels are no worse than
    any of these runs, and on the truncated normal beat uniform levels by more than 5x at 3 and 4
    bits (Psi_alq / Psi_uniform = 0.148 and 0.0998)."""
    rng = np.random.default_rng(0)
    for n in (3, 4, 8, 16):
        finals = []
        for name, lv in _starts(n, rng).items():
            f = expected_variance(lv, dist)
            for sweep in range(25):
                new = _cd_sweep(lv, dist)
                f_new = expected_variance(new, dist)  # also checks 0 = l_0 < ... < l_{n-1} = 1
                slack = 16 * _roundoff(lv, dist)
                assert f_new <= f + slack, (n, name, sweep, f, f_new)
                if sweep == 0:
                    assert f_new < 0.99 * f, (n, name, f, f_new)
                lv, f = new, f_new
            finals.append(f)
        alq = expected_variance(alq_levels(dist, n), dist)
        assert alq <= min(finals) * (1 + 1e-9), (n, alq, finals)
    if dist is TRUNC_NORMAL:
        for bits, ratio in ((3, 0.148), (4, 0.0998)):  # measured Psi_alq / Psi_uniform
            n = levels_for_bits(bits)
            alq, uni = expected_variance(alq_levels(dist, n), dist), expected_variance(uniform_levels(n), dist)
            assert alq < 0.2 * uni and alq / uni == pytest.approx(ratio, abs=1e-3), (bits, alq, uni)


def _psi_batch(interior: np.ndarray, dist) -> np.ndarray:
    """Psi of many level sets at once: interior (..., k) -> (...,)."""
    shape = interior.shape[:-1]
    lv = np.concatenate([np.zeros(shape + (1,)), interior, np.ones(shape + (1,))], axis=-1)
    lo, hi = lv[..., :-1], lv[..., 1:]
    m0, m1, m2 = dist.moments(lo, hi)
    return np.sum(-m2 + (lo + hi) * m1 - lo * hi * m0, axis=-1)


@pytest.mark.parametrize("dist", [TRUNC_NORMAL, MIXTURE], ids=["truncnorm", "mixture"])
def test_alq_reaches_the_brute_force_optimum_for_one_and_two_interior_levels(dist):
    """Psi over a grid of all (l_1) and (l_1 < l_2) (step 1/400), polished by Nelder-Mead: ALQ's
    levels have Psi no higher than the best found (relative 1e-9)."""
    grid = np.linspace(0, 1, 401)[1:-1]
    one = _psi_batch(grid[:, None], dist)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    pairs = np.stack([a, b], axis=-1)[a < b]  # (P, 2)
    two = _psi_batch(pairs, dist)
    for n, start, psi in ((3, grid[[one.argmin()]], one), (4, pairs[two.argmin()], two)):

        def objective(x):
            x = np.asarray(x, float)
            if np.any(x <= 0) or np.any(x >= 1) or np.any(np.diff(x) <= 0):
                return np.inf
            return float(_psi_batch(x, dist))

        res = optimize.minimize(objective, start, method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-16})
        brute = min(res.fun, psi.min())
        alq = expected_variance(alq_levels(dist, n), dist)
        assert alq <= brute * (1 + 1e-9), (n, alq, brute)


def test_alq_with_many_levels_and_no_mass_near_1():
    """N(0, 0.1^2) on [0, 1] has no mass near 1; with 32 levels the exact coordinate update puts a
    level at 1 - 1e-14, which `_strict` once lifted to 1 + 9e-13 (alq_levels then raised)."""
    for n in (16, 32, 64, 128):
        lv = alq_levels(TRUNC_NORMAL, n)
        assert lv[0] == 0 and lv[-1] == 1 and torch.all(torch.diff(lv) > 0), n


@pytest.mark.parametrize("seed", range(20))
def test_strict_levels_on_adversarial_input(seed):
    """Ties, values outside [0, 1], levels crowded against either end: always 0 = l_0 < ... < 1."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 70))
    raw = rng.choice([0.0, 1.0, 1 - 1e-14, 1e-14, -0.5, 1.5, 0.3], size=n) if seed % 2 else rng.uniform(-0.2, 1.2, n)
    eps = 1e-12
    lv = _strict(np.asarray(raw, dtype=np.float64), eps)
    assert lv[0] == 0.0 and lv[-1] == 1.0
    assert np.all(np.diff(lv) >= eps * (1 - 1e-3)), np.diff(lv).min()
    expected_variance(lv, TRUNC_NORMAL)  # accepted by every later use of the levels


# ---------------------------------------------------------------- 3. AMQ: dPsi/dp and the central interval


def _l2_fit():
    return fit_truncnorm(torch.randn(2**16, generator=torch.Generator().manual_seed(0)), 8192)


def _psi_without_central(p: float, dist, n: int) -> float:
    """Psi of (0, p^(n-2), ..., p, 1) over the intervals [l_j, l_{j+1}], j >= 1 (no [0, l_1])."""
    lv = exponential_levels(n, p).numpy()
    lo, hi = lv[1:-1], lv[2:]
    m0, m1, m2 = dist.moments(lo, hi)
    return float(np.sum(-m2 + (lo + hi) * m1 - lo * hi * m0))


def _grad_without_central(p: float, dist, n: int) -> float:
    """d/dp of _psi_without_central: for each interior level l_j, int (r - l_{j-1}) dP over
    [l_{j-1}, l_j] (except for j = 1: that is the central interval) minus int (l_{j+1} - r) dP over
    [l_j, l_{j+1}], times dl_j/dp = k p^(k-1) with l_j = p^k."""
    lv = exponential_levels(n, p).numpy()
    m0, m1, _ = dist.moments(lv[:-1], lv[1:])
    below = m1[:-1] - lv[:-2] * m0[:-1]
    below[0] = 0.0
    above = lv[2:] * m0[1:] - m1[1:]
    k = np.arange(n - 2, 0, -1, dtype=float)
    return float(np.dot(below - above, k * p ** (k - 1)))


def _fd(f, p, h=1e-6):
    return (f(p + h) - f(p - h)) / (2 * h)


GRID_P = np.linspace(0.05, 0.95, 19)


@pytest.mark.parametrize("name", ["truncnorm", "mixture", "l2-fit"])
def test_amq_derivative_matches_finite_differences_over_p_and_n(name):
    """|dPsi/dp - FD| <= 1e-5 |FD| + 1e-8 max_p |FD| at p = 0.05, 0.10, ..., 0.95 and n = 3, 4, 8,
    16 (measured: at most 1.5e-10 of max |FD|)."""
    dist = {"truncnorm": TRUNC_NORMAL, "mixture": MIXTURE, "l2-fit": _l2_fit()}[name]
    for n in (3, 4, 8, 16):
        grads = np.array([amq_variance_and_grad(p, dist, n)[1] for p in GRID_P])
        fds = np.array([_fd(lambda q: amq_variance_and_grad(q, dist, n)[0], p) for p in GRID_P])
        scale = np.abs(fds).max()
        assert scale > 0
        np.testing.assert_array_less(np.abs(grads - fds), 1e-5 * np.abs(fds) + 1e-8 * scale)


@pytest.mark.parametrize("name", ["truncnorm", "mixture", "l2-fit"])
def test_amq_keeps_the_central_interval(name):
    """For distributions with their mass near 0:
    (i) dPsi/dp = (the derivative without [0, l_1]) + (n-2) p^(n-3) int_0^{l_1} r dP exactly, and
        the derivative without it matches FD of Psi without it (so it is the right reference);
    (ii) the derivative without the central interval misses the full FD by more than 0.1 max_p |FD|
        somewhere on the p grid (measured 0.15-1.0); at AMQ's optimum p* (full dPsi/dp ~ 1e-10) it
        is negative and 1e4 times larger (measured >= 4e6 times): p* is no stationary point of it;
        [0, l_1] holds at least 10 % of Psi(p*) (measured 11-84 %);
    (iii) AMQ's p* minimizes the full Psi over a grid of 999 p, and the p minimizing Psi without the
        central interval (it is cheapest to cover all the mass by [0, l_1]) has more than 3x the
        full Psi of p* (measured 3.7x-390x)."""
    dist = {"truncnorm": TRUNC_NORMAL, "mixture": MIXTURE, "l2-fit": _l2_fit()}[name]
    for n in (3, 4, 8, 16):
        full = np.array([amq_variance_and_grad(p, dist, n)[1] for p in GRID_P])
        fds = np.array([_fd(lambda q: amq_variance_and_grad(q, dist, n)[0], p) for p in GRID_P])
        trunc = np.array([_grad_without_central(p, dist, n) for p in GRID_P])
        trunc_fd = np.array([_fd(lambda q: _psi_without_central(q, dist, n), p) for p in GRID_P])
        scale = np.abs(fds).max()
        central = np.array([(n - 2) * p ** (n - 3) * dist.moments(0.0, p ** (n - 2))[1] for p in GRID_P])
        np.testing.assert_allclose(full, trunc + central, rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_array_less(np.abs(trunc - trunc_fd), 1e-5 * np.abs(trunc_fd) + 1e-8 * scale)
        miss = np.abs(trunc - fds).max() / scale
        assert miss > 0.1, (n, miss)

        lv, p_star = amq_levels(dist, n)
        psi_star = expected_variance(lv, dist)
        fine = np.linspace(1e-3, 1 - 1e-3, 999)
        psi_full = np.array([amq_variance_and_grad(p, dist, n)[0] for p in fine])
        assert psi_star <= psi_full.min() * (1 + 1e-9), (n, p_star, psi_star, fine[psi_full.argmin()])
        g_trunc_star = _grad_without_central(p_star, dist, n)
        g_star = amq_variance_and_grad(p_star, dist, n)[1]
        assert g_trunc_star < 0 and abs(g_trunc_star) > 1e4 * abs(g_star), (n, g_trunc_star, g_star)
        lv1 = p_star ** (n - 2)
        lo, hi = np.array([0.0]), np.array([lv1])
        m0, m1, m2 = dist.moments(lo, hi)
        share = float(-m2[0] + lv1 * m1[0]) / psi_star  # [0, l_1]'s part of Psi at p*
        assert share > 0.1, (n, share)

        p_trunc = fine[np.argmin([_psi_without_central(p, dist, n) for p in fine])]
        psi_trunc = amq_variance_and_grad(p_trunc, dist, n)[0]
        print(f"{name} n={n}: p*={p_star:.4f} Psi {psi_star:.4g} ([0, l_1] is {share:.0%} of it, "
              f"dPsi_without/dp(p*) = {g_trunc_star / scale:+.3f} max|dPsi/dp|); max miss {miss:.2f}; "
              f"p without central {p_trunc:.3f}: Psi {psi_trunc:.4g} = {psi_trunc / psi_star:.1f}x")  # fmt: skip
        assert psi_trunc > 3 * psi_star, (n, p_trunc, psi_trunc, psi_star)
