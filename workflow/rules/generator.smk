# Stages `extract_latents` (codes of every training view) and `train_generator` (HAR on the cached codes).


rule extract_latents:
    message:
        "Encoding the training views with the EMA tokenizer"
    input:
        "src/restok/stages/extract_latents.py",
        "src/restok/models",
        "src/restok/data",
        "data/shard",
        "data/train_tokenizer/tokenizer.pt",
    output:
        directory("data/extract_latents"),
        "results/extract_latents/summary.json",
    params:
        **stage_params("profile", "extract_latents"),
    log:
        "logs/extract_latents.log",
    threads: config["resources"]["extract_latents"]["cpus"]
    resources:
        **rule_resources("extract_latents"),
    shell:
        "python -m restok.stages.extract_latents --params params.yaml --shards data/shard --tokenizer data/train_tokenizer/tokenizer.pt --out data/extract_latents --results results/extract_latents > {log} 2>&1"


rule train_generator:
    message:
        "Training the {params.generator[mode]} generator ({resources.nodes} node(s) x {resources.gpus_per_node} GPU(s))"
    input:
        "src/restok/stages/train_generator.py",
        "src/restok/models",
        "src/restok/train",
        "src/restok/convert",
        "data/extract_latents",
    output:
        "data/train_generator/generator.pt",
        "results/train_generator/metrics.json",
        "results/train_generator/curve.tsv",
    params:
        **stage_params("profile", "generator", "train_generator"),
    log:
        "logs/train_generator.log",
    threads: config["resources"]["train_generator"]["cpus"]
    resources:
        **rule_resources("train_generator"),
    shell:
        "RESTOK_NPROC_PER_NODE={resources.gpus_per_node} RESTOK_NNODES={resources.nodes} "
        "python -m restok.stages.train_generator --params params.yaml --latents data/extract_latents --out data/train_generator --results results/train_generator > {log} 2>&1"


FINAL_TARGETS += rules.train_generator.output
