# Stage `shard`: raw images -> webdataset shards + manifests (src/restok/stages/shard.py).


rule shard:
    message:
        "Sharding {params.data[source]} images into webdataset tars"
    input:
        "src/restok/config/data.py",
        "src/restok/config/engine.py",
        "src/restok/config/load.py",
        "src/restok/cpus.py",
        "src/restok/data/builtin.py",
        "src/restok/data/shards.py",
        "src/restok/data/sources.py",
        "src/restok/data/views.py",
        "src/restok/hashing.py",
        "src/restok/io.py",
        "src/restok/provenance.py",
        "src/restok/stages/__init__.py",
        "src/restok/stages/shard.py",
        "src/restok/train/log.py",
    output:
        directory("data/shard"),
        "results/shard/summary.json",
        "results/shard/samples.png",
        "results/shard/provenance.json",
    params:
        **stage_params("profile", "data", "shard"),
    log:
        "logs/shard.log",
    threads: config["resources"]["shard"]["cpus"]
    resources:
        **rule_resources("shard"),
    shell:
        "python -m restok.stages.shard --params params.yaml --out data/shard --results results/shard > {log} 2>&1"


FINAL_TARGETS += rules.shard.output
