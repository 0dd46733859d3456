rule sensitivity_batch:
    input:
        model=paths.CHECKPOINT,
        calibration=paths.CALIBRATION,
    output:
        batch=paths.BATCH,
    log:
        "logs/{model}/sensitivity/{estimator}/batch_{batch}.log",
    wildcard_constraints:
        estimator="|".join(ADDITIVE_ESTIMATORS) or "none",
    conda:
        "../envs/mpqflow.yaml"
    threads: config["threads"]
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=gpu_if_cuda,
    params:
        model=model_config,
        quant=config["quant"],
        plan=sample_plan(with_pool=False),
        settings=estimator_settings,
        code=stage_code("sensitivity"),
    script:
        "../workflow_scripts/sensitivity_batch.py"


rule pool_set:
    input:
        batches=set_batch_files,
    output:
        pooled=paths.SET,
    log:
        "logs/{model}/sensitivity/{estimator}/set_{n}x{s}.log",
    wildcard_constraints:
        estimator="|".join(ADDITIVE_ESTIMATORS) or "none",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        code=stage_code("sensitivity"),
    script:
        "../workflow_scripts/pool_set.py"


# LIMPQ's indicators of one set: a training run (or an imported LIMPQ pickle), not a sum over
# batches, so the set file comes from this rule and not from sensitivity_batch + pool_set.
rule limpq_indicators:
    input:
        unpack(limpq_imported),
        model=paths.CHECKPOINT,
        calibration=paths.CALIBRATION,
    output:
        indicators=paths.LIMPQ_SET,
    log:
        "logs/{model}/sensitivity/limpq/set_{n}x{s}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: limpq_threads
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=limpq_gpus,
    params:
        model=model_config,
        seed=config["seed"],
        quant=config["quant"],
        plan=sample_plan(with_pool=False),
        batches=limpq_batches,
        # without alpha: retuning the search's alpha re-solves, it does not retrain the indicators
        settings=LIMPQ.to_dict(),
        code=stage_code("limpq_indicators"),
        # epoch checkpoints: outside the outputs, so an incomplete job's cleanup keeps them to resume
        state_dir=paths.LIMPQ_STATE,
    script:
        "../workflow_scripts/limpq_indicators.py"
