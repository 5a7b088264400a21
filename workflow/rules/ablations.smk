# The ablation grid as a Snakemake target: `snakemake ablations -c2`.
# Each run (variant x seed, params `ablations`) gets data/ablations/<run>/ and results/ablations/<run>/ for the
# stages its overrides touch and everything downstream of them; every other input points at the base run's
# outputs, so e.g. the plain-AR variant reuses the tokenizer and its latents. The variant rules are derived from
# dvc.yaml (restok.ablate.Graph): the same commands, with the params file and artifact paths redirected. Each job
# writes its run's params file (data/ablations/<run>/params.yaml, atomically) before its command; the rule's
# `params:` hold the run's values of the sections the stage declares, so a hand-changed switch reruns only the
# stages that read it and their downstream.
from pathlib import Path

from restok import ablate
from restok.config.ablations import VARIANT_NAME

ABLATION_GRAPH = ablate.Graph("dvc.yaml")
ABLATION_RUNS = ablate.runs(config)
ABLATION_OWN = {run: ABLATION_GRAPH.own(config, tree) for run, tree in ABLATION_RUNS.items()}


wildcard_constraints:
    run=VARIANT_NAME.pattern.strip("^$"),  # a run is a variant name (validated) or one with -s<k>


def ablation_output(path):
    """A variant's copy of a stage output; dvc.yaml outs without a suffix are folders."""
    out = ABLATION_GRAPH.path(path, "{run}", set(ABLATION_GRAPH.stages))
    return out if Path(path).suffix else directory(out)


for _stage in ABLATION_GRAPH.stages.values():

    rule:
        name:
            f"ablation_{_stage.name}"
        input:
            lambda w, s=_stage: [ABLATION_GRAPH.path(d, w.run, ABLATION_OWN[w.run]) for d in s.deps],
        output:
            [ablation_output(o) for o in _stage.outs],
        log:
            f"logs/ablations/{{run}}/{_stage.name}.log",
        params:
            # the run's values of the sections this stage declares: a rule reruns when one of them changes (as in
            # the base graph), not when any other key of params.yaml does
            sections=lambda w, s=_stage: {name: ABLATION_RUNS[w.run][name] for name in s.params},
            cmd=lambda w, s=_stage: ABLATION_GRAPH.command(s.name, w.run, ABLATION_OWN[w.run]),
        threads: config["resources"][_stage.name]["cpus"]
        resources:
            **rule_resources(_stage.name),
        shell:
            # every substituted value is quoted (:q) but params.cmd, a whole command that Graph.command quotes word
            # by word (shlex.join)
            "python -m restok.ablate params --params params.yaml --run {wildcards.run:q} "
            "--out data/ablations/{wildcards.run:q}/params.yaml && "
            "RESTOK_NPROC_PER_NODE={resources.gpus_per_node:q} RESTOK_NNODES={resources.nodes:q} {params.cmd} "
            "> {log:q} 2>&1"


rule ablations:
    message:
        "Ablation table over {params.runs} runs"
    input:
        [ABLATION_GRAPH.path(p, run, ABLATION_OWN[run]) for run in ABLATION_RUNS
         for p in ("results/metrics.json", "results/sample/grid.png")],
    output:
        "results/ablations.md",
        "results/ablations.json",
        "results/ablations.png",
    params:
        runs=len(ABLATION_RUNS),
    shell:
        "python -m restok.ablate table --from files --params params.yaml --results results"
