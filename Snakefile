# restok-pipeline as a Snakemake workflow: the same stages, commands, params and outputs as dvc.yaml.
#   snakemake -c2                                          # local (workflow/profiles/default is loaded automatically)
#   snakemake --workflow-profile workflow/profiles/slurm   # SLURM through snakemake-executor-plugin-slurm
#   snakemake --workflow-profile workflow/profiles/sbatch  # plain sbatch (what `--cluster sbatch` used to do)
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/generator.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/ablations.smk"


onstart:
    print(f"restok-pipeline: profile {config['profile']!r}, params.yaml validated")


rule all:
    default_target: True
    input:
        FINAL_TARGETS,
