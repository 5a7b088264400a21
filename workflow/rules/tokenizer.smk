# Stages `cache_features` (teacher features per view) and `train_tokenizer` (ResTok training).
# Training resumes from data/train_tokenizer/ckpt/, which is not an output (Snakemake deletes a failed job's
# outputs); the stage finds it next to tokenizer.pt. Multi-GPU/multi-node: the stage relaunches itself under
# torchrun from RESTOK_NPROC_PER_NODE / RESTOK_NNODES (src/restok/launch.py), set here from params `resources`.


rule cache_features:
    message:
        "Caching {params.vf[teacher]} features of the training views"
    input:
        "src/restok/config/engine.py",
        "src/restok/config/features.py",
        "src/restok/config/load.py",
        "src/restok/cpus.py",
        "src/restok/data/features.py",
        "src/restok/data/shards.py",
        "src/restok/data/views.py",
        "src/restok/hashing.py",
        "src/restok/io.py",
        "src/restok/launch.py",
        "src/restok/models/teacher.py",
        "src/restok/provenance.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/cache_features.py",
        "src/restok/train/dist.py",
        "src/restok/train/log.py",
        "src/restok/weights.py",
        "data/shard",
    output:
        directory("data/cache_features"),
        "results/cache_features/summary.json",
        "results/cache_features/provenance.json",
    params:
        **stage_params("profile", "vf", "cache_features"),
    log:
        "logs/cache_features.log",
    threads: config["resources"]["cache_features"]["cpus"]
    resources:
        **rule_resources("cache_features"),
    shell:
        "python -m restok.stages.cache_features --params params.yaml --shards data/shard --out data/cache_features --results results/cache_features > {log} 2>&1"


rule train_tokenizer:
    message:
        "Training the ResTok tokenizer ({resources.nodes} node(s) x {resources.gpus_per_node} GPU(s))"
    input:
        "src/restok/artifacts.py",
        "src/restok/config/engine.py",
        "src/restok/config/features.py",
        "src/restok/config/load.py",
        "src/restok/config/tokenizer.py",
        "src/restok/config/training.py",
        "src/restok/convert/checkpoint.py",
        "src/restok/convert/official.py",
        "src/restok/convert/released.py",
        "src/restok/convert/tokenizer.py",
        "src/restok/cpus.py",
        "src/restok/data/features.py",
        "src/restok/data/shards.py",
        "src/restok/data/views.py",
        "src/restok/deps.py",
        "src/restok/hashing.py",
        "src/restok/io.py",
        "src/restok/launch.py",
        "src/restok/losses/gan.py",
        "src/restok/losses/loss_config.py",
        "src/restok/losses/recon.py",
        "src/restok/losses/vf.py",
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
        "src/restok/models/teacher.py",
        "src/restok/models/tokenizer.py",
        "src/restok/models/tokenizer_config.py",
        "src/restok/models/vit.py",
        "src/restok/provenance.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/train_tokenizer.py",
        "src/restok/train/ckpt.py",
        "src/restok/train/dist.py",
        "src/restok/train/ema.py",
        "src/restok/train/finite.py",
        "src/restok/train/log.py",
        "src/restok/train/lr.py",
        "src/restok/train/optim.py",
        "src/restok/weights.py",
        "data/shard",
        "data/cache_features",
    output:
        "data/train_tokenizer/tokenizer.pt",
        "results/train_tokenizer/metrics.json",
        "results/train_tokenizer/curve.tsv",
        "results/train_tokenizer/recon.png",
        "results/train_tokenizer/provenance.json",
    params:
        **stage_params("profile", "vf", "tokenizer", "train_tokenizer"),
    log:
        "logs/train_tokenizer.log",
    threads: config["resources"]["train_tokenizer"]["cpus"]
    resources:
        **rule_resources("train_tokenizer"),
    shell:
        "RESTOK_NPROC_PER_NODE={resources.gpus_per_node} RESTOK_NNODES={resources.nodes} "
        "python -m restok.stages.train_tokenizer --params params.yaml --shards data/shard --features data/cache_features --out data/train_tokenizer --results results/train_tokenizer > {log} 2>&1"


FINAL_TARGETS += rules.train_tokenizer.output
