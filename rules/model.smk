rule train_model:
    output:
        model=paths.CHECKPOINT,
    log:
        "logs/{model}/train_model.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: train_threads
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=train_gpus,
    params:
        model=model_config,
        seed=config["seed"],
        code=stage_code("train"),
        # epoch checkpoints: outside the outputs, so an incomplete job's cleanup keeps them to resume
        state_dir=paths.TRAIN_STATE,
    script:
        "../workflow_scripts/train_model.py"


rule calibrate:
    input:
        model=paths.CHECKPOINT,
    output:
        calibration=paths.CALIBRATION,
        layers=paths.LAYERS,
    log:
        "logs/{model}/calibrate.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        model=model_config,
        seed=config["seed"],
        quant=config["quant"],
        code=stage_code("calibrate"),
    script:
        "../workflow_scripts/calibrate.py"
