"""Per-batch files: option indexing, round trip, exact pooling (uneven last batch included, any order),
and clear refusals naming both files when files do not belong together."""

import json

import numpy as np
import pytest
import torch
from conftest import sensitivity_settings

from mpqflow.methods import clado_matrix
from mpqflow.models import build_model
from mpqflow.sensitivity import (
    OptionIndex,
    batch_meta,
    compute_batch,
    load_batch_file,
    pool_batch_files,
    save_batch_file,
)
from mpqflow.sensitivity.common import make_context

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

QUIET = sensitivity_settings(progress=False)


@pytest.fixture(scope="module")
def digits_ctx():
    torch.manual_seed(0)
    net = build_model("digits_cnn", 1, 10)
    x = torch.randn(64, 1, 8, 8)
    ctx = make_context(net, x[:32], w_bits=(2, 4), a_bits=(4, 8))
    return ctx, x[32:59], torch.randint(0, 10, (27,))


def test_option_index():
    idx = OptionIndex(("a", "b", "c"), ((8, 8), (4, 8)))
    assert (idx.L, idx.K, idx.n) == (3, 2, 6)
    assert idx.layer_of.tolist() == [0, 0, 1, 1, 2, 2]
    assert idx.option_of.tolist() == [0, 1, 0, 1, 0, 1]
    assert idx.index(2, 1) == 5
    assert idx.assignment({"first": (8, 8)}, 1, 4) == {"first": (8, 8), "a": (4, 8), "c": (8, 8)}


def test_round_trip(tmp_path, digits_ctx):
    ctx, x, y = digits_ctx
    payload = compute_batch("mpqco", ctx, x[:5], y[:5], {})
    meta = batch_meta(ctx, "mpqco", {"batch_size": 5})
    save_batch_file(tmp_path / "b.npz", payload, meta)
    back = load_batch_file(tmp_path / "b.npz")
    assert back["estimator"] == "mpqco" and back["layers"] == list(ctx.table.candidates)
    assert back["options"].tolist() == [list(o) for o in ctx.table.options]
    assert json.loads(back["quant"]) == ctx.quant.to_dict()
    assert int(back["count"]) == 5
    np.testing.assert_array_equal(back["sq_sum"], payload["sq_sum"])
    # a loaded dict carries its meta: it can be written again as is
    save_batch_file(tmp_path / "c.npz", back)
    assert load_batch_file(tmp_path / "c.npz")["checkpoint_sha256"] == back["checkpoint_sha256"]


def test_pooled_G_equals_G_of_the_union(tmp_path, digits_ctx):
    ctx, x, y = digits_ctx
    sizes = [10, 10, 7]  # uneven last batch
    paths, s = [], 0
    meta = batch_meta(ctx, "clado", QUIET)
    for b, n in enumerate(sizes):
        payload = compute_batch("clado", ctx, x[s : s + n], y[s : s + n], QUIET)
        paths.append(tmp_path / f"batch_{b}.npz")
        save_batch_file(paths[-1], payload, meta)
        s += n
    pooled = pool_batch_files(paths)
    shuffled = pool_batch_files(paths[::-1])
    union = compute_batch("clado", ctx, x, y, QUIET)
    assert int(pooled["count"]) == 27
    idx = OptionIndex.from_table(ctx.table)
    for kind in ("ce", "kl"):
        G_pool, G_all = clado_matrix(pooled, kind), clado_matrix(union, kind, idx.layer_of)
        scale = np.abs(G_all).max()
        assert np.abs(G_pool - G_all).max() <= 1e-6 * scale
        np.testing.assert_allclose(clado_matrix(shuffled, kind), G_pool, rtol=1e-12, atol=1e-12 * scale)
    # a pooled file pools again with the rest (sums of sums)
    save_batch_file(tmp_path / "set.npz", pool_batch_files(paths[:2]))
    again = pool_batch_files([tmp_path / "set.npz", paths[2]])
    np.testing.assert_allclose(again["ce_pair_sum"], pooled["ce_pair_sum"], rtol=1e-12)


def test_hawq_constants_are_kept_not_summed(tmp_path, digits_ctx):
    ctx, x, y = digits_ctx
    meta = batch_meta(ctx, "hawq", sensitivity_settings(hawq_max_probes=3))
    for b in range(2):
        payload = compute_batch(
            "hawq", ctx, x[b * 5 : (b + 1) * 5], y[b * 5 : (b + 1) * 5], sensitivity_settings(hawq_max_probes=3)
        )
        save_batch_file(tmp_path / f"h{b}.npz", payload, meta)
    pooled = pool_batch_files([tmp_path / "h0.npz", tmp_path / "h1.npz"])
    np.testing.assert_allclose(pooled["weight_err"], payload["weight_err"])
    assert int(pooled["count"]) == 10
    bad = dict(load_batch_file(tmp_path / "h1.npz"), weight_err=payload["weight_err"] * 1.5)
    save_batch_file(tmp_path / "h2.npz", bad)
    with pytest.raises(ValueError, match=r"h0\.npz.*h2\.npz.*weight_err"):
        pool_batch_files([tmp_path / "h0.npz", tmp_path / "h2.npz"])


@pytest.mark.parametrize(
    "field, change",
    [
        ("estimator", lambda m: m.update(estimator="hawq")),
        ("layers", lambda m: m.update(layers=m["layers"][::-1])),
        ("options", lambda m: m.update(options=m["options"][::-1].copy())),
        ("quant", lambda m: m.update(quant=json.dumps({**json.loads(m["quant"]), "fixed_bits": 6}, sort_keys=True))),
        ("checkpoint_sha256", lambda m: m.update(checkpoint_sha256="0" * 64)),
        ("settings", lambda m: m.update(settings=json.dumps({"loss": "other"}))),
    ],
)
def test_mismatched_files_are_refused_naming_both(tmp_path, digits_ctx, field, change):
    ctx, x, y = digits_ctx
    payload = {"sq_sum": np.ones(len(ctx.table.candidates) * len(ctx.table.options)), "count": np.int64(4)}
    meta = batch_meta(ctx, "mpqco", {})
    save_batch_file(tmp_path / "batch_0.npz", payload, meta)
    other = dict(meta)
    change(other)
    save_batch_file(tmp_path / "batch_1.npz", payload, other)
    with pytest.raises(ValueError) as err:
        pool_batch_files([tmp_path / "batch_0.npz", tmp_path / "batch_1.npz"])
    msg = str(err.value)
    assert "batch_0.npz" in msg and "batch_1.npz" in msg and repr(field) in msg
    if field == "quant":
        assert "fixed_bits" in msg


def test_missing_meta_and_keys_are_errors(tmp_path, digits_ctx):
    ctx, _, _ = digits_ctx
    with pytest.raises(ValueError, match="meta fields"):
        save_batch_file(tmp_path / "x.npz", {"sq_sum": np.ones(3), "count": 1})
    meta = batch_meta(ctx, "mpqco", {})
    save_batch_file(tmp_path / "a.npz", {"sq_sum": np.ones(3), "count": 1}, meta)
    save_batch_file(tmp_path / "b.npz", {"sq_sum": np.ones(3), "other_sum": np.ones(3), "count": 1}, meta)
    with pytest.raises(ValueError, match=r"a\.npz.*b\.npz.*payload keys"):
        pool_batch_files([tmp_path / "a.npz", tmp_path / "b.npz"])
    with pytest.raises(ValueError, match="at least one"):
        pool_batch_files([])
