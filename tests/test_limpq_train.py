"""LIMPQ's training half: the switchable LSQ model (mpqflow/sensitivity/limpq.py), the indicator
stage (mpqflow/stages/limpq_indicators.py) and its config, on a small digits CNN trained and calibrated once.

The workflow rule (2 gloo processes, the limpq decisions fine-tuned) runs in the tiny study of
test_workflow.py."""

import copy
import json

import numpy as np
import pytest
import torch

from mpqflow.artifacts import load_batch_file, load_layer_table
from mpqflow.config import Config, ConfigError, FinetuneConfig, LimpqConfig, SolverConfig, validate_config
from mpqflow.config_checks import MAX_LSQ_BITS as CHECKED_MAX_BITS
from mpqflow.context import load_context
from mpqflow.data import sensitivity_set
from mpqflow.indicators import limpq_allowed, limpq_forbidden_bits, write_limpq_pickle
from mpqflow.quant.lsq import MAX_LSQ_BITS
from mpqflow.sensitivity.limpq import SwitchableBatchNorm2d, indicator_payload, limpq_loss, limpq_supernet
from mpqflow.stages import calibrate, train
from mpqflow.stages.limpq_indicators import run_limpq_indicators
from mpqflow.stages.solve import solve_budget

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "models": {"m": {"arch": "digits_cnn", "dataset": {"name": "digits"}, "train": {"epochs": 4, "lr": 0.1}}},
    # unfolded: LIMPQ's supernet switches a BatchNorm copy per bit mode (with quant.fold_bn the BNs are
    # in the convs and there is none to switch; the tiny workflow trains that case)
    "quant": {
        "w_bits": [2, 4, 8],
        "a_bits": [4, 8],
        "calibration_samples": 64,
        "calibration_batch_size": 32,
        "fold_bn": False,
    },  # fmt: skip
    "sensitivity": {"batch_size": 32, "pool_batches": 4},
    "methods": ["uniform", "limpq"],
    "budgets": ["avg_bits-4"],
    "study": {"set_sizes": [2], "sets_per_size": 1},
    "limpq": {"epochs": 4, "batch_size": 32},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, dir) with the model trained and calibrated."""
    cfg = Config.from_dict(validate_config(RAW))
    d = tmp_path_factory.mktemp("limpq")
    m = cfg.models["m"]
    train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, str(d / "model.pt"))
    calibrate.calibrate(m, cfg.quant, cfg.seed, cfg.runtime, str(d / "model.pt"), str(d / "calibration.pt"),
                        str(d / "layers.json"), plan=cfg.sample_plan)  # fmt: skip
    return cfg, d


def _context(cfg, d):
    return load_context(
        cfg.models["m"], cfg.quant, cfg.seed, cfg.runtime, str(d / "model.pt"), str(d / "calibration.pt")
    )


def _job(cfg, d, out, **settings):
    data = {**cfg.limpq.to_dict(), **settings}["data"]
    batches = sensitivity_set(2, 0, cfg.sample_plan.pool_batches, cfg.seed) if data == "set" else None
    return dict(model=cfg.models["m"], quant=cfg.quant, seed=cfg.seed,
                plan=cfg.sample_plan, settings=LimpqConfig.from_dict({**cfg.limpq.to_dict(), **settings}),
                checkpoint=str(d / "model.pt"), calibration=str(d / "calibration.pt"), set_size=2, set_id=0,
                batches=batches, out_path=str(out), state_dir=str(out) + ".state")  # fmt: skip


@pytest.fixture(scope="module")
def trained(run):
    """The indicator file of set 2x0 trained on the whole training split, and the steps it started from."""
    cfg, d = run
    ctx = _context(cfg, d)
    initial = indicator_payload(limpq_supernet(ctx.net, ctx.table, ctx.quantizer, seed=0), ctx.table, samples=0)
    out = d / "limpq_train.npz"
    run_limpq_indicators(_job(cfg, d, out, data="train"), cfg.runtime)
    return load_batch_file(out), initial


def test_supernet_runs_every_bit_mode_with_its_own_batchnorm_and_one_random_assignment(run):
    cfg, d = run
    ctx = _context(cfg, d)
    net = limpq_supernet(ctx.net, ctx.table, ctx.quantizer, seed=3)
    assert net.modes == 3 and [net.mode_bits(k) for k in range(3)] == [(8, 8), (4, 4), (2, 4)]
    bns = {n: m for n, m in net.net.named_modules() if isinstance(m, SwitchableBatchNorm2d)}
    assert sorted(bns) == ["bn2", "bn3"]  # after the candidates conv2, conv3; bn1 follows the fixed conv1
    x = torch.randn(5, 1, 8, 8)
    net.train()
    out = net(x)
    assert out.shape == (4, 5, 10)  # 3 modes + 1 random assignment
    assert int(net.draws) == 1
    # each mode trained its own BatchNorm copy: their running statistics differ
    means = [c.running_mean.clone() for c in bns["bn3"].copies]
    assert not torch.allclose(means[0], means[2])
    # the random assignment is a function of (seed, draws): the same again after a reset
    a = net.random_assignment()
    assert a == net.random_assignment() and set(a.values()) <= set(ctx.table.options)
    # eval: one forward of the current setting; W2A4 moves the logits more from W8A8 than W4A4 does
    net.eval()
    evals = []
    for k in range(3):
        net.set_mode(k)
        evals.append(net(x))
    assert evals[0].shape == (5, 10)
    assert (evals[2] - evals[0]).abs().mean() > (evals[1] - evals[0]).abs().mean() > 0
    loss, logits = limpq_loss(net.train(), x, torch.arange(5))
    assert logits.shape == (5, 10) and loss.requires_grad


def test_indicator_training_moves_the_steps_monotone_in_bits(trained, run):
    """The steps move from their initial values; lower bits learn larger steps (LIMPQ's premise)
    except where the outlier rule says so: the forbidden options are exactly the non-monotone ones."""
    payload, initial = trained
    for key in ("w_indicator", "a_indicator"):
        moved = np.abs(payload[key] - initial[key]) / initial[key]
        assert moved.max() > 1e-3, (key, moved)
        s = payload[key]  # (L, K) columns in descending bits
        non_monotone = s[:, 1:] < s[:, :-1]
        assert (limpq_forbidden_bits(s)[:, 1:] == non_monotone).all()
    assert payload["w_indicator"].shape == (2, 3) and payload["a_indicator"].shape == (2, 2)
    assert list(payload["w_bits"]) == [8, 4, 2] and list(payload["a_bits"]) == [8, 4]
    # on this model every step is monotone: a regression here means the training broke the premise
    assert not limpq_forbidden_bits(payload["w_indicator"]).any()
    assert not limpq_forbidden_bits(payload["a_indicator"]).any()
    cfg, d = run
    table = load_layer_table(d / "layers.json")
    assert limpq_allowed(payload, table).all()
    assert payload["estimator"] == "limpq" and payload["layers"] == list(table.candidates)
    assert json.loads(payload["settings"])["data"] == "train" and int(payload["count"]) > 1000


def test_same_config_same_indicators_and_set_data_differs(run, trained, tmp_path):
    cfg, d = run
    payload, _ = trained
    again = tmp_path / "again.npz"
    run_limpq_indicators(_job(cfg, d, again, data="train"), cfg.runtime)
    np.testing.assert_array_equal(load_batch_file(again)["w_indicator"], payload["w_indicator"])
    np.testing.assert_array_equal(load_batch_file(again)["a_indicator"], payload["a_indicator"])
    on_set = tmp_path / "set.npz"
    run_limpq_indicators(_job(cfg, d, on_set, data="set"), cfg.runtime)
    set_payload = load_batch_file(on_set)
    assert int(set_payload["count"]) == 2 * 32  # the set's two pool batches
    assert not np.array_equal(set_payload["w_indicator"], payload["w_indicator"])
    assert not (d / "again.npz.state").exists()  # the epoch checkpoints go once the file exists


def test_imported_pickle_becomes_the_set_file_and_the_search_reads_it(run, trained, tmp_path):
    cfg, d = run
    payload, _ = trained
    table = load_layer_table(d / "layers.json")
    edited = {**payload, "w_indicator": payload["w_indicator"].copy()}
    edited["w_indicator"][0, 2] = edited["w_indicator"][0, 1] / 2  # conv2's 2-bit step below its 4-bit one
    pkl = tmp_path / "indicators.pkl"
    write_limpq_pickle(pkl, edited, ["module." + l for l in table.candidates])  # DataParallel names
    out = tmp_path / "set_2x0.npz"
    run_limpq_indicators(_job(cfg, d, out, indicators=str(pkl)), cfg.runtime)
    got = load_batch_file(out)
    np.testing.assert_allclose(got["w_indicator"], edited["w_indicator"])
    assert int(got["count"]) == 0
    solver = SolverConfig.from_dict(cfg.solver.to_dict())
    decision = solve_budget(str(d / "layers.json"), str(out), "limpq", "avg_bits-4", solver, str(tmp_path / "d.json"),
                            {"alpha": 1.5})  # fmt: skip
    assert decision["alpha"] == 1.5
    assert sorted(decision["forbidden"]) == ["conv2:w2a4", "conv2:w2a8"]
    assert not decision["choice"][0].startswith("w2")


def test_config_checks_of_the_limpq_section(tmp_path):
    assert MAX_LSQ_BITS == CHECKED_MAX_BITS
    raw = copy.deepcopy(RAW)
    raw["limpq"] = {"indicators": str(tmp_path / "nope.pkl")}
    with pytest.raises(ConfigError, match=r"config key 'limpq.indicators': '.*nope.pkl' is not an existing file"):
        validate_config(raw)
    raw["limpq"] = {"world_size": 4, "batch_size": 2}
    with pytest.raises(ConfigError, match="config key 'limpq.world_size': 4 processes need a batch_size of at least 4"):
        validate_config(raw)
    raw["limpq"] = {}
    raw["quant"] = {**raw["quant"], "w_bits": [4, 16]}
    with pytest.raises(ConfigError, match=r"LSQ steps of at most 8 bits, .* reach 16"):
        validate_config(raw)
    raw["methods"] = ["uniform", "mpqco"]  # no limpq: its section is not checked
    validate_config(raw)
    raw = copy.deepcopy(RAW)
    raw["limpq"] = {"data": "pool"}
    with pytest.raises(ConfigError, match="limpq.data"):
        validate_config(raw)
    raw["limpq"] = {"epochs": 4, "prune": {"method": "l1_unstructured", "amount": 0.5, "rewind_epoch": 4}}
    with pytest.raises(
        ConfigError, match=r"'limpq.prune.rewind_epoch': 4 is not an epoch of the first round; expected 0..3"
    ):
        validate_config(raw)
    raw["limpq"] = {"prune": {"method": "l1_unstructured", "amount": 1.0}}
    with pytest.raises(ConfigError, match="limpq.prune.amount"):
        validate_config(raw)
    pkl = tmp_path / "i.pkl"
    pkl.write_bytes(b"")
    raw["limpq"] = {"indicators": str(pkl), "prune": {"method": "ln_structured", "amount": 0.3}}
    with pytest.raises(ConfigError, match="'limpq.prune': pruning happens during the indicator pretraining"):
        validate_config(raw)
    raw["limpq"] = {"prune": {"method": "ln_structured", "amount": 0.3}}
    assert validate_config(raw)["limpq"]["prune"] == {"amount": 0.3, "iterations": 1, "method": "ln_structured",
                                                      "rewind_epoch": 0}  # fmt: skip


def test_interrupted_indicator_run_resumes_to_the_same_indicators(run, tmp_path, monkeypatch, caplog):
    """Killed in its third epoch, the run resumes from the second epoch's checkpoint (weights, steps,
    BatchNorm copies, optimizer and the random-assignment counter) to the uninterrupted indicators."""
    import mpqflow.sensitivity.limpq as stage  # where the training rounds look up their loss
    from mpqflow.sensitivity.limpq import limpq_loss as real_loss

    cfg, d = run
    reference = tmp_path / "reference.npz"
    run_limpq_indicators(_job(cfg, d, reference), cfg.runtime)  # data: set, 2 steps per epoch
    calls = {"n": 0}

    def dies_in_epoch_3(model, x, y):
        calls["n"] += 1
        if calls["n"] == 5:  # the first step of epoch 3
            raise KeyboardInterrupt("killed")
        return real_loss(model, x, y)

    out = tmp_path / "resumed.npz"
    monkeypatch.setattr(stage, "limpq_loss", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_limpq_indicators(_job(cfg, d, out), cfg.runtime)
    assert not out.exists() and (tmp_path / "resumed.npz.state" / "epoch.pt").is_file()
    monkeypatch.setattr(stage, "limpq_loss", real_loss)
    with caplog.at_level("INFO", logger="mpqflow"):
        run_limpq_indicators(_job(cfg, d, out), cfg.runtime)
    assert "2 of 4 epochs done" in caplog.text
    for key in ("w_indicator", "a_indicator"):
        np.testing.assert_array_equal(load_batch_file(out)[key], load_batch_file(reference)[key])


# ---- LIMPQP: iterative magnitude pruning with rewinding ----


def test_prune_helpers_iterate_rewind_and_bake():
    from torch.nn.utils import prune as torch_prune

    from mpqflow.quant.prune import bake_masks, mask_weights, prune_layers, rewind, sparsity, weight_masks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 6, 1))
    snapshot = copy.deepcopy(net.state_dict())
    layers = {"0": net[0], "1": net[1]}
    for _ in range(2):
        prune_layers(layers, "l1_unstructured", 0.5)  # each round half of what is left
    masks = weight_masks(layers)
    assert [int(m.sum()) for m in masks.values()] == [72, 12]  # 288 -> 144 -> 72, 48 -> 24 -> 12
    assert sparsity(masks) == pytest.approx(0.75)
    w = net[0].weight_orig.detach().abs()
    assert w[torch.from_numpy(masks["0"])].min() >= w[~torch.from_numpy(masks["0"])].max()  # the largest survive
    with torch.no_grad():
        net[0].weight_orig.add_(1.0)  # "training"
    rewind(net, snapshot)
    np.testing.assert_array_equal(net[0].weight_orig.detach(), snapshot["0.weight"])
    assert (net[0].weight.detach()[~torch.from_numpy(masks["0"])] == 0).all()
    bake_masks(net)
    assert not torch_prune.is_pruned(net) and int((net[0].weight != 0).sum()) == 72
    fresh = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    prune_layers({"0": fresh[0]}, "ln_structured", 0.5)
    channel_kept = weight_masks({"0": fresh[0]})["0"].reshape(8, -1)
    assert sorted(channel_kept.all(1).tolist()) == [False] * 4 + [True] * 4  # whole output channels
    dense = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    mask_weights(dense, {"0": channel_kept.reshape(8, 4, 3, 3)})
    assert int((dense[0].weight.detach().reshape(8, -1).abs().sum(1) == 0).sum()) == 4
    with pytest.raises(ValueError, match="pruning mask of shape"):
        mask_weights(dense, {"0": np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="unknown pruning method 'random'"):
        prune_layers(layers, "random", 0.5)


PRUNE = {"method": "l1_unstructured", "amount": 0.5, "iterations": 2, "rewind_epoch": 1}


@pytest.fixture(scope="module")
def pruned(run, tmp_path_factory):
    """A LIMPQP indicator file of set 2x0 (2 prune-and-rewind rounds of 4 epochs, then the final one)."""
    cfg, d = run
    out = tmp_path_factory.mktemp("pruned") / "set_2x0.npz"
    run_limpq_indicators(_job(cfg, d, out, prune=PRUNE), cfg.runtime)
    return out


def test_pruned_indicator_run_stores_masks_and_resumes_between_rounds(run, pruned, tmp_path, monkeypatch):
    """The file holds each candidate's mask (a quarter kept after two halvings); a run killed in its
    second round resumes from the first pruning's checkpoint to the same masks and indicators."""
    import mpqflow.sensitivity.limpq as stage  # where the training rounds look up their loss
    from mpqflow.indicators import prune_masks
    from mpqflow.sensitivity.limpq import limpq_loss as real_loss

    cfg, d = run
    got = load_batch_file(pruned)
    masks = prune_masks(got)
    assert sorted(masks) == ["conv2", "conv3"]
    for m in masks.values():
        assert m.mean() == pytest.approx(0.25, abs=1e-3)
    assert json.loads(got["settings"])["prune"] == PRUNE
    calls = {"n": 0}

    def dies_in_round_2(model, x, y):
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 3:  # round 0: 4 epochs x 2 steps; then the 3rd step of round 1
            raise KeyboardInterrupt("killed")
        return real_loss(model, x, y)

    out = tmp_path / "set_2x0.npz"
    monkeypatch.setattr(stage, "limpq_loss", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_limpq_indicators(_job(cfg, d, out, prune=PRUNE), cfg.runtime)
    state = tmp_path / "set_2x0.npz.state"
    assert (state / "prune.pt").is_file() and (state / "round_1" / "epoch.pt").is_file()
    monkeypatch.setattr(stage, "limpq_loss", real_loss)
    run_limpq_indicators(_job(cfg, d, out, prune=PRUNE), cfg.runtime)
    again = load_batch_file(out)
    for key in ("w_indicator", "a_indicator", "prune_mask.conv2", "prune_mask.conv3"):
        np.testing.assert_array_equal(again[key], got[key], err_msg=key)
    assert not state.exists()


def test_pruned_decision_is_evaluated_and_fine_tuned_with_its_masks(run, pruned, tmp_path):
    """Evaluation zeroes the pruned weights; fine-tuning keeps them 0 and saves them baked in."""
    from mpqflow.finetuned import read_finetuned
    from mpqflow.indicators import read_prune_masks
    from mpqflow.stages.evaluate import evaluate_decisions
    from mpqflow.stages.finetune import run_finetune

    cfg, d = run
    solver = SolverConfig.from_dict(cfg.solver.to_dict())
    decision = tmp_path / "decisions" / "limpq" / "set_2x0" / "avg_bits-4.json"
    solve_budget(str(d / "layers.json"), str(pruned), "limpq", "avg_bits-4", solver, str(decision), {"alpha": 2.0})
    args = (cfg.models["m"], cfg.quant, cfg.sample_plan, cfg.evaluation, cfg.runtime, str(d / "model.pt"),
            str(d / "calibration.pt"), [str(decision)])  # fmt: skip
    dense = evaluate_decisions(*args, [str(tmp_path / "dense.json")])[0]
    sparse = evaluate_decisions(*args, [str(tmp_path / "sparse.json")], masks=str(pruned))[0]
    assert "pruned_fraction" not in dense and sparse["pruned_fraction"] == pytest.approx(0.75, abs=1e-3)
    assert sparse["loss"] != dense["loss"]
    out = tmp_path / "ft"
    outputs = {"model": f"{out}.pt", "export": f"{out}.export.pt", "export_meta": f"{out}.export.json"}
    settings = FinetuneConfig.from_dict({**cfg.finetune.to_dict(), "epochs": 1})
    job = dict(model=cfg.models["m"], quant=cfg.quant, seed=cfg.seed, settings=settings,
               checkpoint=str(d / "model.pt"), calibration=str(d / "calibration.pt"),
               target={"decision": str(decision)}, outputs=outputs, state_dir=str(tmp_path / "ft_state"),
               masks=str(pruned))  # fmt: skip
    record = run_finetune(job, cfg.runtime)
    assert record["pruned_fraction"] == pytest.approx(0.75, abs=1e-3)
    state = read_finetuned(outputs["model"])["state_dict"]
    for layer, mask in read_prune_masks(pruned).items():
        w = state[f"{layer}.weight"]
        assert (w[~torch.from_numpy(mask)] == 0).all() and (w[torch.from_numpy(mask)] != 0).all()
