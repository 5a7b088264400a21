"""params.yaml -> frozen dataclasses, validated at the boundary; one module per job.

    engine      the validation engine (types, ranges, unknown/missing keys) and the YAML reader
    data, features, tokenizer, latents, generator, sample, evaluation, training, ablations, resources
                the sections: one frozen dataclass per top-level key of params.yaml, grouped by the stages that
                read them
    sections    every top-level key and its type (`SECTIONS`)
    validate    the whole-file check: every section, then the rules that span sections and the ablation variants
    load        what a stage calls: `load_params(path, PARAMS)`
    stage       a stage's opening: its arguments and its params
    profiles    `workflow/params/*.yaml` overlays -> params.yaml
    schema      the JSON schema Snakemake validates against (`restok schema`)

A stage imports only the modules of the sections it reads, so an edit to another section's code (or to the model
config behind it) reruns only the stages that read that section (`restok deps`). This file holds no code: every
stage runs it.
"""
