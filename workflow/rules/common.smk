# Shared helpers: params validation, per-stage params and per-rule compute resources.
from snakemake.utils import validate

# Fails before any job (and before anything reaches SLURM) on a wrong type, unknown key or bad enum.
validate(config, schema="../schemas/params.schema.yaml")


def stage_params(*sections):
    """The params sections a stage reads: a rule reruns when one of them changes (as DVC's `params:`)."""
    return {name: config[name] for name in sections}


def rule_resources(rule):
    """Compute resources from params.yaml `resources.<rule>`; site settings (partition, account) live in profiles.

    `gpus` is per node. It goes to SLURM as `gres=gpu:<n>` (sbatch --gres, per node), not as Snakemake's `gpu`,
    which snakemake-executor-plugin-slurm 2.8.0 maps to --gpus, the job's total. A multi-node rule is an MPI-style
    job for the plugin (`mpi`, one task per node): its command runs once on the first node, outside any job step,
    and restok.launch starts one torchrun per node with srun. `tasks_per_gpu: 0` keeps the plugin from adding
    --ntasks-per-gpu. `gpus_per_node` is what the shell commands read (RESTOK_NPROC_PER_NODE).
    """
    r = config["resources"][rule]
    res = dict(gpus_per_node=r["gpus"], nodes=r["nodes"], cpus_per_task=r["cpus"], mem_mb=r["mem_mb"],
               runtime=r["runtime"])
    if r["gpus"] > 0:
        res["gres"] = f"gpu:{r['gpus']}"
    if r["nodes"] > 1:
        res.update(mpi="srun", tasks=r["nodes"], tasks_per_gpu=0)
    return res


# The final outputs of the graph, extended by each rules file as stages land.
FINAL_TARGETS = []
