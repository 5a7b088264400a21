# Stages `extract_latents` (codes of every training view) and `train_generator` (HAR on the cached codes).


rule extract_latents:
    message:
        "Encoding the training views with the EMA tokenizer"
    input:
        "src/restok/artifacts.py",
        "src/restok/config/engine.py",
        "src/restok/config/latents.py",
        "src/restok/config/load.py",
        "src/restok/cpus.py",
        "src/restok/data/shards.py",
        "src/restok/data/views.py",
        "src/restok/hashing.py",
        "src/restok/io.py",
        "src/restok/metrics.py",
        "src/restok/models/attention.py",
        "src/restok/models/generator.py",
        "src/restok/models/generator_config.py",
        "src/restok/models/masks.py",
        "src/restok/models/pixel_cnn.py",
        "src/restok/models/quantizer.py",
        "src/restok/models/recompute.py",
        "src/restok/models/recompute_mode.py",
        "src/restok/models/rope.py",
        "src/restok/models/tokenizer.py",
        "src/restok/models/tokenizer_config.py",
        "src/restok/models/vit.py",
        "src/restok/provenance.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/extract_latents.py",
        "src/restok/train/log.py",
        "src/restok/weights.py",
        "data/shard",
        "data/train_tokenizer/tokenizer.pt",
    output:
        directory("data/extract_latents"),
        "results/extract_latents/summary.json",
        "results/extract_latents/provenance.json",
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
        "src/restok/artifacts.py",
        "src/restok/config/engine.py",
        "src/restok/config/generator.py",
        "src/restok/config/load.py",
        "src/restok/config/training.py",
        "src/restok/convert/checkpoint.py",
        "src/restok/convert/official.py",
        "src/restok/convert/released.py",
        "src/restok/convert/tokenizer.py",
        "src/restok/cpus.py",
        "src/restok/deps.py",
        "src/restok/hashing.py",
        "src/restok/io.py",
        "src/restok/launch.py",
        "src/restok/models/attention.py",
        "src/restok/models/generator.py",
        "src/restok/models/generator_config.py",
        "src/restok/models/masks.py",
        "src/restok/models/pixel_cnn.py",
        "src/restok/models/quantizer.py",
        "src/restok/models/recompute.py",
        "src/restok/models/recompute_mode.py",
        "src/restok/models/rope.py",
        "src/restok/models/teacher.py",
        "src/restok/models/tokenizer.py",
        "src/restok/models/tokenizer_config.py",
        "src/restok/models/vit.py",
        "src/restok/provenance.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/train_generator.py",
        "src/restok/train/ckpt.py",
        "src/restok/train/dist.py",
        "src/restok/train/ema.py",
        "src/restok/train/finite.py",
        "src/restok/train/log.py",
        "src/restok/train/lr.py",
        "src/restok/train/optim.py",
        "src/restok/weights.py",
        "data/extract_latents",
    output:
        "data/train_generator/generator.pt",
        "results/train_generator/metrics.json",
        "results/train_generator/curve.tsv",
        "results/train_generator/provenance.json",
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
