# Stages `sample`, `reference_stats`, `score` and `cfg_search`.


rule sample:
    message:
        "Sampling {params.sample[per_class]} images per class"
    input:
        "src/restok/artifacts.py",
        "src/restok/config/engine.py",
        "src/restok/config/load.py",
        "src/restok/config/sample.py",
        "src/restok/cpus.py",
        "src/restok/images.py",
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
        "src/restok/models/tokenizer.py",
        "src/restok/models/tokenizer_config.py",
        "src/restok/models/vit.py",
        "src/restok/provenance.py",
        "src/restok/sampling.py",
        "src/restok/sampling_config.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/sample.py",
        "src/restok/train/dist.py",
        "src/restok/train/log.py",
        "data/train_generator/generator.pt",
        "data/train_tokenizer/tokenizer.pt",
    output:
        directory("data/sample"),
        "results/sample/summary.json",
        "results/sample/grid.png",
        "results/sample/provenance.json",
    params:
        **stage_params("profile", "sample"),
    log:
        "logs/sample.log",
    threads: config["resources"]["sample"]["cpus"]
    resources:
        **rule_resources("sample"),
    shell:
        "RESTOK_NPROC_PER_NODE={resources.gpus_per_node} RESTOK_NNODES={resources.nodes} "
        "python -m restok.stages.sample --params params.yaml --generator data/train_generator/generator.pt --tokenizer data/train_tokenizer/tokenizer.pt --out data/sample --results results/sample > {log} 2>&1"


rule reference_stats:
    message:
        "Reference statistics ({params.fid[extractor]}, {params.fid[reference]})"
    input:
        "src/restok/config/engine.py",
        "src/restok/config/evaluation.py",
        "src/restok/config/load.py",
        "src/restok/cpus.py",
        "src/restok/data/shards.py",
        "src/restok/data/views.py",
        "src/restok/fid.py",
        "src/restok/hashing.py",
        "src/restok/io.py",
        "src/restok/metrics.py",
        "src/restok/probe.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/reference_stats.py",
        "src/restok/train/log.py",
        "src/restok/weights.py",
        "data/shard",
    output:
        directory("data/reference_stats"),
    params:
        **stage_params("profile", "fid"),
    log:
        "logs/reference_stats.log",
    threads: config["resources"]["reference_stats"]["cpus"]
    resources:
        **rule_resources("reference_stats"),
    shell:
        "python -m restok.stages.reference_stats --params params.yaml --shards data/shard --out data/reference_stats > {log} 2>&1"


rule score:
    message:
        "Scoring samples and reconstructions ({params.fid[extractor]})"
    input:
        "src/restok/artifacts.py",
        "src/restok/checks.py",
        "src/restok/config/engine.py",
        "src/restok/config/evaluation.py",
        "src/restok/config/load.py",
        "src/restok/cpus.py",
        "src/restok/data/shards.py",
        "src/restok/data/views.py",
        "src/restok/fid.py",
        "src/restok/hashing.py",
        "src/restok/images.py",
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
        "src/restok/probe.py",
        "src/restok/provenance.py",
        "src/restok/sampling.py",
        "src/restok/sampling_config.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/score.py",
        "src/restok/train/dist.py",
        "src/restok/train/log.py",
        "src/restok/weights.py",
        "data/sample",
        "data/reference_stats",
        "data/train_tokenizer/tokenizer.pt",
        "data/shard",
        "results/train_tokenizer/metrics.json",
        "results/train_tokenizer/provenance.json",
        "results/train_generator/metrics.json",
        "results/train_generator/provenance.json",
        "results/sample/summary.json",
        "results/sample/provenance.json",
        "results/extract_latents/summary.json",
    output:
        "results/README.md",
        "results/score/metrics.json",
        "results/metrics.json",
        "results/score/provenance.json",
        "results/provenance.json",
    params:
        **stage_params("profile", "fid", "checks"),
    log:
        "logs/score.log",
    threads: config["resources"]["score"]["cpus"]
    resources:
        **rule_resources("score"),
    shell:
        "python -m restok.stages.score --params params.yaml --samples data/sample --reference data/reference_stats --tokenizer data/train_tokenizer/tokenizer.pt --shards data/shard --results results --tokenizer-metrics results/train_tokenizer/metrics.json --generator-metrics results/train_generator/metrics.json --sample-summary results/sample/summary.json --latents-summary results/extract_latents/summary.json > {log} 2>&1"


rule cfg_search:
    message:
        "CFG scale search over {params.cfg_search[scales]}"
    input:
        "src/restok/artifacts.py",
        "src/restok/config/engine.py",
        "src/restok/config/evaluation.py",
        "src/restok/config/load.py",
        "src/restok/config/sample.py",
        "src/restok/cpus.py",
        "src/restok/data/shards.py",
        "src/restok/data/views.py",
        "src/restok/fid.py",
        "src/restok/hashing.py",
        "src/restok/images.py",
        "src/restok/io.py",
        "src/restok/launch.py",
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
        "src/restok/sampling.py",
        "src/restok/sampling_config.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/cfg_search.py",
        "src/restok/train/dist.py",
        "src/restok/train/log.py",
        "src/restok/weights.py",
        "data/train_generator/generator.pt",
        "data/train_tokenizer/tokenizer.pt",
        "data/reference_stats",
    output:
        "results/cfg_search/cfg_search.json",
        "results/cfg_search/fid_vs_scale.png",
        "results/cfg_search/provenance.json",
    params:
        **stage_params("profile", "sample", "fid", "cfg_search"),
    log:
        "logs/cfg_search.log",
    threads: config["resources"]["cfg_search"]["cpus"]
    resources:
        **rule_resources("cfg_search"),
    shell:
        "RESTOK_NPROC_PER_NODE={resources.gpus_per_node} RESTOK_NNODES={resources.nodes} "
        "python -m restok.stages.cfg_search --params params.yaml --generator data/train_generator/generator.pt --tokenizer data/train_tokenizer/tokenizer.pt --reference data/reference_stats --results results/cfg_search > {log} 2>&1"


FINAL_TARGETS += rules.score.output + rules.cfg_search.output
