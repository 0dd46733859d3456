"""methods.py: every method's estimator and objective from one pooled file, and its estimated loss."""

import numpy as np
import pytest
import torch
from conftest import sensitivity_settings

from mpqflow.methods import (
    METHODS,
    clado_diff_se,
    clado_matrix,
    clado_matrix_se,
    estimated_loss_increase,
    method_estimator,
    method_objective,
    psd_project,
    reference_options,
)
from mpqflow.models import build_model
from mpqflow.sensitivity import OptionIndex, batch_meta, compute_batch
from mpqflow.sensitivity.common import make_context

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def pooled():
    torch.manual_seed(0)
    net = build_model("digits_cnn", 1, 10)
    x = torch.randn(48, 1, 8, 8)
    ctx = make_context(net, x[:32], w_bits=(2, 4), a_bits=(4, 8))
    x, y = x[32:], torch.randint(0, 10, (16,))
    out = {}
    settings = sensitivity_settings(progress=False, hawq_max_probes=5)
    for est in ("clado", "mpqco", "hawq"):
        payload = compute_batch(est, ctx, x, y, settings)
        out[est] = {**payload, **batch_meta(ctx, est, settings)}
    return ctx, out


def test_registry():
    assert set(METHODS) == {
        *("uniform", "mpqco", "hawq", "clado", "clado_raw", "clado_naive", "clado_kl", "clado_na", "zeroq", "limpq")
    }
    assert method_estimator("uniform") is None
    assert {m: method_estimator(m) for m in ("clado_kl", "zeroq", "mpqco", "hawq")} == {
        "clado_kl": "clado",
        "zeroq": "clado",
        "mpqco": "mpqco",
        "hawq": "hawq",
    }
    with pytest.raises(ValueError, match="unknown method"):
        method_estimator("nope")


def test_objectives(pooled):
    ctx, files = pooled
    table = ctx.table
    idx = OptionIndex.from_table(table)
    Gce, Gkl = clado_matrix(files["clado"], "ce"), clado_matrix(files["clado"], "kl")
    x = np.zeros(idx.n)
    x[[idx.index(l, (l + 1) % idx.K) for l in range(idx.L)]] = 1

    G, lin = method_objective("clado_raw", files["clado"], table)
    assert lin is None and np.array_equal(G, Gce)
    assert estimated_loss_increase("clado_raw", (G, lin), x) == pytest.approx(x @ Gce @ x / 2)

    G, lin = method_objective("clado", files["clado"], table)
    assert np.linalg.eigvalsh(G).min() >= -1e-10 and np.allclose(G, psd_project(Gce))
    G, lin = method_objective("clado_kl", files["clado"], table)
    assert np.allclose(G, psd_project(Gkl))
    # noise-aware: interactions soft-thresholded at k SE, effects at k SE above, then the projection;
    # k = 0 is clado
    # (the effects' bound on the SE of their paired difference to the layer's highest option)
    se, dse = clado_matrix_se(files["clado"]), clado_diff_se(files["clado"])
    G, lin = method_objective("clado_na", files["clado"], table, {"k": 1.5})
    shrunk = np.sign(Gce) * np.clip(np.abs(Gce) - 1.5 * se, 0, None)
    ref = reference_options(table)
    assert [table.options[r % len(table.options)] for r in ref] == [max(table.options)] * len(ref)
    np.fill_diagonal(shrunk, np.diag(Gce) + 1.5 * dse[np.arange(len(ref)), ref])
    want = psd_project(shrunk)
    assert lin is None and np.allclose(G, want) and not np.allclose(G, psd_project(Gce))
    assert np.allclose(method_objective("clado_na", files["clado"], table, {"k": 0})[0], psd_project(Gce))

    # diagonal methods: linear = diag(G), the same objective as diag(G) as a matrix on binary x
    for m, Gm in (("clado_naive", Gce), ("zeroq", Gkl)):
        G, lin = method_objective(m, files["clado"], table)
        assert G is None and np.array_equal(lin, np.diag(Gm))
        assert estimated_loss_increase(m, (G, lin), x) == pytest.approx(x @ np.diag(np.diag(Gm)) @ x / 2)

    # zeroq's estimate of a single option is its mean KL to the base model
    _, lin = method_objective("zeroq", files["clado"], table)
    e = np.eye(idx.n)[3]
    assert estimated_loss_increase("zeroq", (None, lin), e) == pytest.approx(files["clado"]["kl_single_sum"][3] / 16)

    G, lin = method_objective("mpqco", files["mpqco"], table)
    assert G is None
    # mpqco's estimate: ΔL = Σ s² / 2N
    assert estimated_loss_increase("mpqco", (G, lin), e) == pytest.approx(files["mpqco"]["sq_sum"][3] / 32)

    G, lin = method_objective("hawq", files["hawq"], table)
    numel = np.repeat([table.numel[l] for l in table.candidates], idx.K)
    tr = np.repeat(files["hawq"]["trace_sum"], idx.K) / 16
    np.testing.assert_allclose(lin, tr / numel * files["hawq"]["weight_err"])

    assert method_objective("uniform", None, table) == (None, None)
    with pytest.raises(ValueError, match="no objective"):
        estimated_loss_increase("uniform", (None, None), x)


def test_wrong_file_for_method(pooled):
    ctx, files = pooled
    with pytest.raises(ValueError, match="needs clado"):
        method_objective("clado", files["mpqco"], ctx.table)
    bad = {**files["clado"], "layers": list(files["clado"]["layers"])[::-1]}
    with pytest.raises(ValueError, match="layers differ"):
        method_objective("clado", bad, ctx.table)


def test_psd_project():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    G = A + A.T
    P = psd_project(G)
    assert np.allclose(P, P.T) and np.linalg.eigvalsh(P).min() >= -1e-10
    lam, V = np.linalg.eigh(G)
    assert np.allclose(P, (V * np.clip(lam, 0, None)) @ V.T)


def test_the_registry_owns_method_settings():
    """A method's own settings come from the config key the registry names, typed and checked; a method
    without settings takes none; no stage, rule or script names a method to branch on."""
    import re
    from pathlib import Path

    from mpqflow.config import CladoNaConfig, ConfigError, LimpqSearchConfig
    from mpqflow.methods import method_settings, settings_of

    config = {"clado_na": {"k": 3.0}, "limpq": {"alpha": 1.5, "epochs": 2}}
    assert method_settings("clado_na", config) == {"k": 3.0}
    assert method_settings("limpq", config) == {"alpha": 1.5}  # the search's alpha alone
    assert method_settings("mpqco", config) == {}
    assert settings_of("clado_na", {"k": "universal"}) == CladoNaConfig(k="universal")
    assert settings_of("limpq", LimpqSearchConfig(alpha=2.0)).alpha == 2.0
    assert settings_of("hawq", {}) is None
    with pytest.raises(ConfigError, match="clado_na.*needs its settings"):
        settings_of("clado_na", None)
    with pytest.raises(ConfigError, match="missing key"):
        settings_of("limpq", {})
    with pytest.raises(ConfigError, match="takes no settings"):
        settings_of("mpqco", {"k": 1})
    repo = Path(__file__).resolve().parent.parent
    names = "|".join(re.escape(m) for m in METHODS if m != "uniform")
    # the check (the two methods with settings, quoted anywhere) and any comparison with a name
    pattern = re.compile(
        rf"""["'](clado_na|limpq)["']|["']({names})["']\s+(not\s+)?in\b|(==|!=|\bin)\s*[\[(]?["']({names})["']"""
    )
    files = [*(repo / "mpqflow" / "stages").glob("*.py"), *(repo / "rules").glob("*.smk")]
    files += [*(repo / "workflow_scripts").glob("*.py")]
    found = [
        f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)
    ]
    assert found == [], f"method names outside the registry: {found}"
