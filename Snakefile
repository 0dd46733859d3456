from snakemake.utils import min_version

min_version("8.20")


# A config given with --configfile is the whole config: the embedded default applies only without one
# (Snakemake would otherwise merge the user's `models:` into the default's and run both).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/sensitivity.smk"
include: "rules/optimize.smk"
include: "rules/evaluate.smk"
include: "rules/study.smk"
include: "rules/ptq.smk"
include: "rules/finetune.smk"
include: "rules/gradquant.smk"


rule all:
    input:
        all_targets(),


onstart:
    check_local_device()


onsuccess:
    report_where()
