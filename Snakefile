from snakemake.utils import min_version

min_version("8.20")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        all_targets(),
