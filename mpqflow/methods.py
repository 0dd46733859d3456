"""Search methods in one place: which estimator each needs and how it forms its objective.

Usage:
    method_estimator("clado_kl")                       # "clado"  (None for uniform)
    settings = method_settings("clado_na", config)     # CladoNaConfig(k="universal"), from config["clado_na"]
    G, linear = method_objective("clado_na", pooled, table, settings)
    estimated_loss_increase("clado", (G, linear), x)   # (xᵀGx + linear·x) / 2

The registry owns everything that differs between methods and estimators: a method's own settings
(a typed section read from the config key it names; None for most), its estimator, and each
estimator's kind (additive per-batch sums or one training run per set, pairwise or not, pruning).
Rules, scripts and stages ask the registry; none of them branches on a method's name.

Convention (shared with mpqflow.optimize.Problem): the objective xᵀGx + linear·x is TWICE the
method's estimated loss increase, as CLADO's G is (G[i,i] = 2(L(i) − L0)). So
    mpqco:  linear = sq_sum / count                      (= 2 ΔL, ΔL = Σ_n s_n² / 2N)
    hawq:   linear = Ω = Tr(H_l)/numel(W_l) · ‖ΔW‖²      (the second-order term ΔWᵀHΔW with H ≈ Tr/numel·I)
    clado_naive / zeroq: linear = diag(G) (for binary x, xᵀdiag(G)x = diag(G)·x; no G given, so
    diagonal methods stay a multiple-choice knapsack for the solver)
    clado_na: noise-aware CLADO, SE from the per-sample entries, then PSD-projected:
            interactions G̃[i, j] = sign(G[i, j]) · max(|G[i, j]| − k·SE[i, j], 0) (i, j of two layers),
            single-layer effects G̃[i, i] = G[i, i] + k·SE(G[i, i] − G[h, h]) (the upper confidence bound
            of their paired difference to the layer's highest option h); k a number or "universal",
            √(2 ln m) for a family of m entries
    limpq:  linear = 2 (Δs_a + α·Δs_w), LIMPQ's learned step sizes relative to the highest bit-width
            (indicator units, not a loss: only its ranking compares with measured losses); options
            that LIMPQ's outlier rule forbids are left out of the problem (:func:`method_allowed`)
One estimator run serves several methods: clado, clado_raw, clado_naive, clado_kl, clado_na and zeroq
all read the same clado files.
Every loss increase (L0 above, and what evaluation measures) is against the base model: the first
and last layers at their fixed bits, every other layer float.
Standard errors (of the mean over samples, from the files' second moments; pooled exactly like the
sums): mpqco_se (n,), clado_matrix_se (n, n), hawq_omega_se (n,) (probe noise, not sample noise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .artifacts import means
from .config import CladoNaConfig, ConfigError, LimpqSearchConfig, Section
from .indicators import limpq_allowed, limpq_linear

__all__ = [
    "Method",
    "METHODS",
    "Estimator",
    "ESTIMATORS",
    "method_estimator",
    "method_settings",
    "settings_of",
    "additive_estimators",
    "pairwise_estimator",
    "estimator_prunes",
    "method_objective",
    "estimated_loss_increase",
    "psd_project",
    "clado_matrix",
    "hawq_omega",
    "hawq_omega_se",
    "mean_se",
    "mpqco_se",
    "clado_matrix_se",
    "clado_diff_se",
    "reference_options",
    "soft_threshold",
    "universal_threshold",
    "clado_na_thresholds",
    "noise_aware_matrix",
    "method_allowed",
    "settings_record",
]


@dataclass(frozen=True)
class Method:
    """A search method.

    Args:
        name: the {method} wildcard.
        estimator: the sensitivity estimator whose files it reads (None: no estimator).
        form: "none" | "linear" | "psd" | "raw" | "diag" | "na" (how the objective is formed).
        loss: "ce" | "kl" for CLADO-based methods (which measured matrix), else None.
        description: one line for tables and logs.
        settings: the method's own settings section (a frozen dataclass), None when it has none.
        config_key: the config section its settings' fields are read from (None: no settings).
    """

    name: str
    estimator: str | None
    form: str
    loss: str | None
    description: str
    settings: type | None = None
    config_key: str | None = None


@dataclass(frozen=True)
class Estimator:
    """A sensitivity estimator.

    Args:
        name: the {estimator} wildcard (results/<model>/sensitivity/<name>/).
        additive: its set files are sums of per-batch files (rule pool_set); False: one run per set.
        pairwise: it measures cross-layer interactions (the study's heat map draws its matrix).
        prune_key: the dotted config key that, when not null, makes its set files carry pruning masks
            that the decisions' evaluation and fine-tuning keep (None: it never prunes).
    """

    name: str
    additive: bool
    pairwise: bool
    prune_key: str | None


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("mpqco", additive=True, pairwise=False, prune_key=None),
        Estimator("hawq", additive=True, pairwise=False, prune_key=None),
        Estimator("clado", additive=True, pairwise=True, prune_key=None),
        Estimator("limpq", additive=False, pairwise=False, prune_key="limpq.prune"),
    )
}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("uniform", None, "none", None, "every candidate layer at one option (no search)"),
        Method("mpqco", "mpqco", "linear", None, "per-sample logit-gradient diagonal (weights only)"),
        Method("hawq", "hawq", "linear", None, "Hutchinson Hessian trace x weight error"),
        Method("clado", "clado", "psd", "ce", "CLADO cross-entropy matrix projected on the PSD cone"),
        Method("clado_raw", "clado", "raw", "ce", "CLADO cross-entropy matrix as measured"),
        Method("clado_naive", "clado", "diag", "ce", "diagonal of the CLADO cross-entropy matrix"),
        Method("clado_kl", "clado", "psd", "kl", "CLADO KL matrix projected on the PSD cone"),
        Method("clado_na", "clado", "na", "ce", "CLADO, interactions thresholded at k SE, effects at k SE above, PSD",
               CladoNaConfig, "clado_na"),
        Method("zeroq", "clado", "diag", "kl", "diagonal of the CLADO KL matrix (ZeroQ-style)"),
        Method("limpq", "limpq", "linear", None, "LIMPQ's learned per-bit step sizes, s_a + alpha * s_w",
               LimpqSearchConfig, "limpq"),
    )
}  # fmt: skip


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def method_estimator(method: str) -> str | None:
    """The estimator whose per-batch files `method` needs (None for uniform)."""
    return _method(method).estimator


def method_settings(method: str, config: dict) -> dict:
    """The method's own settings read from a validated config ({} for a method without any): what a
    rule passes as its one `settings` param, so retuning one method's setting re-solves that method only."""
    m = _method(method)
    if m.settings is None:
        return {}
    section = config[m.config_key]
    return {f.name: section[f.name] for f in dataclasses.fields(m.settings)}


def settings_of(method: str, settings) -> Section | None:
    """The method's typed settings from `settings` (its dict, e.g. a rule's param, or the typed
    section itself); None for a method without settings. Missing or unknown keys are refused."""
    m = _method(method)
    if m.settings is None:
        if settings:
            raise ConfigError(f"method {method!r} takes no settings, got {dict(settings)}")
        return None
    if isinstance(settings, m.settings):
        return settings
    if settings is None:
        raise ConfigError(f"method {method!r} needs its settings ({m.config_key}: {m.settings.__name__})")
    return m.settings.from_dict(dict(settings))


def settings_record(settings: Section | None) -> dict:
    """The settings as a decision records them: numbers as floats, strings as they are."""
    if settings is None:
        return {}
    return {k: (v if isinstance(v, str) else float(v)) for k, v in settings.to_dict().items()}


def additive_estimators(estimators) -> list[str]:
    """Those of `estimators` whose set files are sums of per-batch files, in the given order."""
    return [e for e in estimators if ESTIMATORS[e].additive]


def pairwise_estimator(estimators) -> str | None:
    """The first of `estimators` that measures cross-layer interactions (None: none does)."""
    return next((e for e in estimators if ESTIMATORS[e].pairwise), None)


def estimator_prunes(estimator: str | None, config: dict) -> bool:
    """Whether the estimator's set files carry pruning masks under this config (its prune key set)."""
    if estimator is None or ESTIMATORS[estimator].prune_key is None:
        return False
    section, key = ESTIMATORS[estimator].prune_key.split(".")
    return config[section][key] is not None


def psd_project(G) -> np.ndarray:
    """Nearest PSD matrix in Frobenius norm: V max(Λ, 0) Vᵀ of the symmetrized G (symmetrized)."""
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square, got shape {G.shape}")
    lam, V = np.linalg.eigh((G + G.T) / 2)  # (n,), (n, n)
    P = (V * np.clip(lam, 0.0, None)) @ V.T
    return (P + P.T) / 2


def clado_matrix(pooled: dict, kind: str = "ce", layer_of: np.ndarray | None = None) -> np.ndarray:
    """CLADO's G (n, n) from a per-batch or pooled CLADO dict: sums / count, then

        G[i, i] = 2 (L(i) - L0);  G[i, j] = L(i, j) - L(i) - L(j) + L0;  G = 0 within a layer.

    Args:
        pooled: payload with the clado keys, plus meta (`options`) unless layer_of is given.
        kind: "ce" (cross-entropy) or "kl" (KL to the base model's softmax; base value 0).
        layer_of: (n,) layer of each option; default from the number of options in pooled["options"].
    """
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    mu = means(pooled)
    Li, Lij = mu[f"{kind}_single"], mu[f"{kind}_pair"]  # (n,), (n, n)
    L0 = mu["ce_base"] if kind == "ce" else 0.0
    n = Li.shape[0]
    if layer_of is None:
        if "options" not in pooled:
            raise ValueError("clado_matrix needs pooled['options'] (meta) or an explicit layer_of")
        K = len(np.asarray(pooled["options"]).reshape(-1, 2))
        layer_of = np.repeat(np.arange(n // K), K)
    layer_of = np.asarray(layer_of)
    G = Lij - Li[:, None] - Li[None, :] + L0
    G[layer_of[:, None] == layer_of[None, :]] = 0.0
    G[np.diag_indices(n)] = 2.0 * (Li - L0)
    return (G + G.T) / 2


def mean_se(total, total_sq, count) -> np.ndarray:
    """Standard error of a mean over `count` samples from Σ v and Σ v²: √(s² / N), s² the unbiased
    sample variance (Σv² − (Σv)²/N) / (N − 1), clipped at 0 (cancellation); 0 when N < 2 (unknown)."""
    n = float(count)
    total, total_sq = np.asarray(total, dtype=np.float64), np.asarray(total_sq, dtype=np.float64)
    if n < 2:
        return np.zeros_like(total)
    var = np.clip(total_sq - total**2 / n, 0.0, None) / (n - 1)
    return np.sqrt(var / n)


def _second_moment(pooled: dict, key: str) -> np.ndarray:
    if key not in pooled:
        raise ValueError(
            f"the sensitivity data has no {key!r} (written before files carried second moments): "
            "recompute it (the workflow reruns its job)"
        )
    return pooled[key]


def mpqco_se(pooled: dict) -> np.ndarray:
    """(n,) standard error of MPQCO's linear term sq_sum / count (the mean of s_n²)."""
    return mean_se(pooled["sq_sum"], _second_moment(pooled, "sq_squared_sum"), pooled["count"])


def clado_matrix_se(pooled: dict, kind: str = "ce") -> np.ndarray:
    """(n, n) standard error of every entry of :func:`clado_matrix` (0 within a layer), from the
    per-sample entries' squares `{kind}_gsq_sum`."""
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    gsq = np.asarray(_second_moment(pooled, f"{kind}_gsq_sum"), dtype=np.float64)  # 0 within a layer
    n = float(pooled["count"])
    # every entry by the cross-layer formula (no within-layer mask): within a layer gsq is 0, so the
    # clipped variance, hence the SE, is 0 there whatever the formula gives
    G = clado_matrix(pooled, kind, layer_of=np.arange(gsq.shape[0]))
    return mean_se(G * n, gsq, n)


def clado_diff_se(pooled: dict, kind: str = "ce") -> np.ndarray:
    """(n, n) standard error of G[i, i] - G[j, j] for two options i, j of one layer (0 across layers),
    from the paired per-sample differences `{kind}_dsq_sum`. A decision takes one option per layer,
    so only these within-layer differences of the diagonal, not its level, decide which is chosen."""
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    dsq = np.asarray(_second_moment(pooled, f"{kind}_dsq_sum"), dtype=np.float64)  # 0 across layers
    n = float(pooled["count"])
    g = np.diag(clado_matrix(pooled, kind, layer_of=np.arange(dsq.shape[0])))  # (n,) the effects
    return mean_se((g[:, None] - g[None, :]) * n, dsq, n)


def reference_options(table) -> np.ndarray:
    """(n,) index of the highest-precision option (largest w_bits, then a_bits) of each option's layer."""
    K = len(table.options)
    h = max(range(K), key=lambda i: tuple(table.options[i]))
    return np.repeat(np.arange(len(table.candidates)) * K + h, K)


def soft_threshold(G: np.ndarray, se: np.ndarray, k: float) -> np.ndarray:
    """sign(G) · max(|G| − k·se, 0): entries within k standard errors of zero become zero, the others
    move toward it by k·se (the lasso / soft-threshold estimator of a mean under Gaussian noise)."""
    G, se = np.asarray(G, dtype=np.float64), np.asarray(se, dtype=np.float64)
    return np.sign(G) * np.clip(np.abs(G) - k * se, 0.0, None)


def universal_threshold(m: int) -> float:
    """√(2 ln m): Donoho & Johnstone's universal threshold in standard errors. Of m pure-noise Gaussian
    entries, the largest exceeds it with probability → 0 as m grows (about 1/√(π ln m)); a fixed k = 2
    lets 4.6 % of them through, i.e. hundreds of spurious interactions in CLADO's thousands of entries."""
    return float(np.sqrt(2.0 * np.log(m))) if m > 1 else 0.0


def clado_na_thresholds(se: np.ndarray, k: float | str, diag_se: np.ndarray | None = None) -> tuple[float, float]:
    """(k for the interactions, k for the diagonal) of :func:`noise_aware_matrix`: the number k for
    both, or for k = "universal" the universal thresholds of the m measured interactions (upper
    triangle of se, SE > 0) and of the diagonal entries with SE > 0 (diag_se, default the diagonal of
    se): a simultaneous bound over each family."""
    if isinstance(k, str):
        if k != "universal":
            raise ValueError(f"clado_na k must be a number >= 0 or 'universal', got {k!r}")
        se = np.asarray(se)
        diag_se = np.diag(se) if diag_se is None else np.asarray(diag_se)
        m = int(np.count_nonzero(np.triu(se, 1) > 0))
        return universal_threshold(m), universal_threshold(int(np.count_nonzero(diag_se > 0)))
    if isinstance(k, bool) or not np.isfinite(k) or k < 0:
        raise ValueError(f"clado_na k must be a number >= 0 or 'universal', got {k!r}")
    return float(k), float(k)


def noise_aware_matrix(G: np.ndarray, se: np.ndarray, k: float | str, diag_se: np.ndarray | None = None) -> np.ndarray:
    """clado_na's G. The n² interaction entries are where one batch's noise lives (CLADO's raw G has
    single-batch entries of −0.1 on the digits ResNet-20): soft-thresholded at k·SE, an interaction
    counts only as far as it is k standard errors from 0. The diagonal (a layer alone at an option)
    goes to an upper confidence bound G[i, i] + k·diag_se[i]: an effect the data cannot pin down is
    not taken as free. Thresholding the diagonal too (measured first) made noisy low-bit options free
    while the precisely measured, tiny effects of the highest option stayed, so with no budget the
    search left the highest option (issue 15's sanity check).

    diag_se (default: the diagonal of se) is what the bound is on. clado_na passes the SE of each
    option's paired difference to its layer's highest-precision option (:func:`clado_diff_se`, 0 for
    that option itself): a decision takes one option per layer, so a constant per layer never changes
    the choice, and the marginal SEs (W8A8 ± 0.0003 against W4A8 ± 0.0003 on one batch, their
    difference ± 0.0001) would let noise decide between two options that the data ranks clearly.
    SE = 0: G unchanged. k: a number of standard errors, or "universal" (:func:`clado_na_thresholds`;
    the diagonal's family is the options with diag_se > 0)."""
    G, se = np.asarray(G, dtype=np.float64), np.asarray(se, dtype=np.float64)
    d = np.diag_indices_from(G)
    diag_se = se[d] if diag_se is None else np.asarray(diag_se, dtype=np.float64)
    k_off, k_diag = clado_na_thresholds(se, k, diag_se)
    out = soft_threshold(G, se, k_off)
    out[d] = G[d] + k_diag * diag_se
    return out


def hawq_omega(pooled: dict, numel) -> np.ndarray:
    """HAWQ's Ω (n,) = (trace_sum/count) / numel(W_l) · weight_err, option i = l*K + k.

    Args:
        pooled: per-batch or pooled HAWQ dict.
        numel: (L,) weights per candidate layer (execution order).
    """
    trace = means(pooled)["trace"]  # (L,) trace of the mean-loss Hessian blocks
    numel = np.asarray(numel, dtype=np.float64)
    err = np.asarray(pooled["weight_err"], dtype=np.float64)
    K = err.shape[0] // trace.shape[0]
    return np.repeat(trace / numel, K) * err


def hawq_omega_se(pooled: dict, numel) -> np.ndarray:
    """Standard error (n,) of :func:`hawq_omega` from the Hutchinson probes' noise: √trace_var_sum/count
    in place of the trace (the weight errors are exact).

    Args:
        pooled: per-batch or pooled HAWQ dict with trace_var_sum (files written since issue 15).
        numel: (L,) weights per candidate layer (execution order).
    """
    se = np.sqrt(np.asarray(_second_moment(pooled, "trace_var_sum"), dtype=np.float64)) / float(pooled["count"])
    numel = np.asarray(numel, dtype=np.float64)
    err = np.asarray(pooled["weight_err"], dtype=np.float64)
    return np.repeat(se / numel, err.shape[0] // se.shape[0]) * err


def _check_pooled(method: Method, pooled: dict, table) -> None:
    est = str(pooled.get("estimator", method.estimator))
    if est != method.estimator:
        raise ValueError(f"method {method.name!r} needs {method.estimator} sensitivities, got a {est} file")
    if "layers" in pooled and list(pooled["layers"]) != list(table.candidates):
        raise ValueError(
            f"method {method.name!r}: the sensitivity file's layers differ from the layer table's candidates"
        )
    if "options" in pooled:
        opts = [tuple(int(b) for b in o) for o in np.asarray(pooled["options"]).reshape(-1, 2)]
        if opts != [tuple(o) for o in table.options]:
            raise ValueError(
                f"method {method.name!r}: the sensitivity file's options {opts} differ from "
                f"the layer table's {list(table.options)}"
            )


def method_objective(method: str, pooled: dict, table, settings=None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(G (n, n) or None, linear (n,) or None): the method's objective xᵀGx + linear·x.

    Args:
        method: a key of METHODS.
        pooled: a pooled (or per-batch) sensitivity dict of the method's estimator (None for uniform).
        table: layers.LayerTable (candidates, options, numel).
        settings: the method's own settings (:func:`settings_of`: its typed section or a dict; required
            for clado_na's k and limpq's alpha, none for the others).
    """
    m = _method(method)
    own = settings_of(method, settings)
    if m.estimator is None:
        return None, None
    _check_pooled(m, pooled, table)
    K = len(table.options)
    layer_of = np.repeat(np.arange(len(table.candidates)), K)
    if m.estimator == "mpqco":
        return None, means(pooled)["sq"]
    if m.estimator == "hawq":
        return None, hawq_omega(pooled, [table.numel[l] for l in table.candidates])
    if m.estimator == "limpq":
        return None, limpq_linear(pooled, table, own.alpha)
    G = clado_matrix(pooled, m.loss, layer_of)
    if m.form == "na":
        paired = clado_diff_se(pooled, m.loss)[np.arange(len(layer_of)), reference_options(table)]  # (n,)
        return psd_project(noise_aware_matrix(G, clado_matrix_se(pooled, m.loss), own.k, paired)), None
    if m.form == "diag":
        return None, np.diag(G).copy()
    if m.form == "psd":
        return psd_project(G), None
    return G, None


def method_allowed(method: str, pooled: dict | None, table) -> np.ndarray | None:
    """(n,) bool of the options the method may choose, or None when all are allowed (LIMPQ's outlier
    rule, :mod:`mpqflow.indicators`, is the only restriction so far)."""
    if _method(method).estimator != "limpq":
        return None
    return limpq_allowed(pooled, table)


def estimated_loss_increase(method: str, objective: tuple, x) -> float:
    """The method's estimated loss increase of decision x: (xᵀGx + linear·x) / 2.

    Args:
        method: a key of METHODS (uniform has no estimate: ValueError).
        objective: (G, linear) from :func:`method_objective`.
        x: (n,) 0/1 decision.
    """
    m = _method(method)
    G, linear = objective
    if m.estimator is None or (G is None and linear is None):
        raise ValueError(f"method {method!r} has no objective, hence no estimated loss increase")
    x = np.asarray(x, dtype=np.float64)
    total = 0.0
    if G is not None:
        total += float(x @ np.asarray(G, dtype=np.float64) @ x)
    if linear is not None:
        total += float(np.asarray(linear, dtype=np.float64) @ x)
    return total / 2
