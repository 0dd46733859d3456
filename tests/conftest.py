"""Shared fixtures: one complete run of the tiny config per test session.

The workflow tests (end to end, reruns, the killed job's reference, the SLURM comparison) read the
same finished run instead of each training and solving the tiny DAG again: on 2 cores a full run
takes about 100 s, and side-by-side runs slowed each other past their timeouts. Tests that use
`tiny_run` may dry-run against it or force reruns that reproduce the same artifacts; none deletes
or edits its results.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"
TINY_RUN_TIMEOUT = 900  # s: the one full tiny run (about 100 s on 2 idle cores)


def snakemake_env():
    """The environment for workflow subprocesses: no spinning torch threads on a shared machine."""
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def snakemake_cmd(workdir, *args, configfile=TINY, snakefile=REPO / "Snakefile"):
    """The command line of `snakemake` on `configfile` in `workdir` (args appended)."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        *args,
    ]


def run_snakemake(workdir, *args, configfile=TINY, snakefile=REPO / "Snakefile", timeout=TINY_RUN_TIMEOUT, check=True):
    """`snakemake --cores 2` on `configfile` in `workdir`; raises with the output tail when it fails."""
    cmd = snakemake_cmd(workdir, "--cores", "2", *args, configfile=configfile, snakefile=snakefile)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=snakemake_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The working directory of one complete run of the tiny config (every default target)."""
    workdir = tmp_path_factory.mktemp("tiny").resolve()
    run_snakemake(workdir, "--quiet", "rules")
    assert (workdir / "results" / "tiny" / "study.csv").is_file()
    return workdir


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine does not slow them 100x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sensitivity_settings(**overrides) -> dict:
    """The sensitivity section's settings with the schema's defaults (the only place they live), as an
    estimator gets them from its rule, with `overrides` on top."""
    from mpqflow.validation import schema_defaults

    return {**schema_defaults("sensitivity"), **overrides}
