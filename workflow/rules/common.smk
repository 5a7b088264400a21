# Shared helpers: params validation, per-stage params and per-rule compute resources.
from snakemake.utils import validate

# Fails before any job (and before anything reaches SLURM) on a wrong type, unknown key or bad enum.
validate(config, schema="../schemas/params.schema.yaml")


def stage_params(*sections):
    """The params sections a stage reads: a rule reruns when one of them changes (as DVC's `params:`)."""
    return {name: config[name] for name in sections}


def rule_resources(rule):
    """Compute resources from params.yaml `resources.<rule>`; site settings (partition, account) live in profiles."""
    r = config["resources"][rule]
    return dict(gpu=r["gpus"], nodes=r["nodes"], cpus_per_task=r["cpus"], mem_mb=r["mem_mb"], runtime=r["runtime"])


# The final outputs of the graph, extended by each rules file as stages land.
FINAL_TARGETS = []
