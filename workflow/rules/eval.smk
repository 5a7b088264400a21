# Stages `sample`, `reference_stats`, `score` and `cfg_search`.


rule sample:
    message:
        "Sampling {params.sample[per_class]} images per class"
    input:
        "src/restok/stages/sample.py",
        "src/restok/sampling.py",
        "src/restok/models",
        "data/train_generator/generator.pt",
        "data/train_tokenizer/tokenizer.pt",
    output:
        directory("data/sample"),
        "results/sample/summary.json",
        "results/sample/grid.png",
    params:
        **stage_params("profile", "sample"),
    log:
        "logs/sample.log",
    threads: config["resources"]["sample"]["cpus"]
    resources:
        **rule_resources("sample"),
    shell:
        "RESTOK_NPROC_PER_NODE={resources.gpu} RESTOK_NNODES={resources.nodes} "
        "python -m restok.stages.sample --params params.yaml --generator data/train_generator/generator.pt --tokenizer data/train_tokenizer/tokenizer.pt --out data/sample --results results/sample > {log} 2>&1"


rule reference_stats:
    message:
        "Reference statistics ({params.fid[extractor]}, {params.fid[reference]})"
    input:
        "src/restok/stages/reference_stats.py",
        "src/restok/metrics.py",
        "src/restok/weights.py",
        "src/restok/data",
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
        "src/restok/stages/score.py",
        "src/restok/stages/reference_stats.py",
        "src/restok/stages/sample.py",
        "src/restok/metrics.py",
        "src/restok/weights.py",
        "src/restok/models",
        "src/restok/data",
        "data/sample",
        "data/reference_stats",
        "data/train_tokenizer/tokenizer.pt",
        "data/shard",
        "results/train_tokenizer/metrics.json",
        "results/train_generator/metrics.json",
        "results/sample/summary.json",
    output:
        "results/README.md",
        "results/score/metrics.json",
        "results/metrics.json",
    params:
        **stage_params("profile", "fid"),
    log:
        "logs/score.log",
    threads: config["resources"]["score"]["cpus"]
    resources:
        **rule_resources("score"),
    shell:
        "python -m restok.stages.score --params params.yaml --samples data/sample --reference data/reference_stats --tokenizer data/train_tokenizer/tokenizer.pt --shards data/shard --results results --tokenizer-metrics results/train_tokenizer/metrics.json --generator-metrics results/train_generator/metrics.json --sample-summary results/sample/summary.json > {log} 2>&1"


rule cfg_search:
    message:
        "CFG scale search over {params.cfg_search[scales]}"
    input:
        "src/restok/stages/cfg_search.py",
        "src/restok/stages/sample.py",
        "src/restok/stages/reference_stats.py",
        "src/restok/sampling.py",
        "src/restok/metrics.py",
        "src/restok/weights.py",
        "src/restok/models",
        "data/train_generator/generator.pt",
        "data/train_tokenizer/tokenizer.pt",
        "data/reference_stats",
    output:
        "results/cfg_search/cfg_search.json",
        "results/cfg_search/fid_vs_scale.png",
    params:
        **stage_params("profile", "sample", "fid", "cfg_search"),
    log:
        "logs/cfg_search.log",
    threads: config["resources"]["cfg_search"]["cpus"]
    resources:
        **rule_resources("cfg_search"),
    shell:
        "RESTOK_NPROC_PER_NODE={resources.gpu} RESTOK_NNODES={resources.nodes} "
        "python -m restok.stages.cfg_search --params params.yaml --generator data/train_generator/generator.pt --tokenizer data/train_tokenizer/tokenizer.pt --reference data/reference_stats --results results/cfg_search > {log} 2>&1"


FINAL_TARGETS += rules.score.output + rules.cfg_search.output
