# Stage `shard`: raw images -> webdataset shards + manifests (src/restok/stages/shard.py).


rule shard:
    message:
        "Sharding {params.data[source]} images into webdataset tars"
    input:
        "src/restok/stages/shard.py",
        "src/restok/data",
    output:
        directory("data/shard"),
        "results/shard/summary.json",
        "results/shard/samples.png",
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
