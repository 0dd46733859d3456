from snakemake.utils import min_version

min_version("8.20")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/sensitivity.smk"
include: "rules/optimize.smk"
include: "rules/evaluate.smk"
include: "rules/study.smk"
include: "rules/ptq.smk"


rule all:
    input:
        all_targets(),


onstart:
    check_local_device()


onsuccess:
    report_where()
