"""gFID of the trained generator vs the same pipeline with an untrained (randomly initialised) generator.

    python benchmarks/untrained_generator.py            # after `dvc repro` (uses data/ and results/ of this checkout)

Builds a generator of exactly the trained one's config with seeded random weights, runs the real `sample` and
`score` stages on it into a temporary folder (same params, tokenizer, reference statistics), and prints both gFIDs
and the class probe's accuracy on both generators' samples, with the extractor that produced them (the real FID
Inception in the default profile). The untrained generator's probe accuracy should sit near chance, 1 / classes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from restok.artifacts import load_artifact, save_artifact
from restok.models.generator import GeneratorConfig, HARGenerator
from restok.provenance import read_results
from restok.stages import sample, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    trained = read_results("results/metrics.json")
    _, config, provenance = load_artifact("data/train_generator/generator.pt")
    torch.manual_seed(args.seed)
    model = HARGenerator(GeneratorConfig(**config))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = tmp / "generator.pt"
        save_artifact(gen, model.state_dict(), config, {"weights": f"random-init(seed={args.seed})", "step": 0})
        sample.main(
            [
                "--params",
                args.params,
                "--generator",
                str(gen),
                "--tokenizer",
                "data/train_tokenizer/tokenizer.pt",
                "--out",
                str(tmp / "sample"),
                "--results",
                str(tmp / "results/sample"),
            ]
        )
        score.main(
            [
                "--params",
                args.params,
                "--samples",
                str(tmp / "sample"),
                "--reference",
                "data/reference_stats",
                "--tokenizer",
                "data/train_tokenizer/tokenizer.pt",
                "--shards",
                "data/shard",
                "--results",
                str(tmp / "results"),
                "--tokenizer-metrics",
                "results/train_tokenizer/metrics.json",
                "--generator-metrics",
                str(tmp / "none.json"),
                "--sample-summary",
                str(tmp / "results/sample/summary.json"),
            ]
        )
        untrained = read_results(tmp / "results/metrics.json")
    print(f"gFID trained generator (step {provenance.get('step')}): {trained['gFID']:.3f}")
    print(f"gFID untrained generator (random init):          {untrained['gFID']:.3f}")
    print(
        f"ratio untrained / trained: {untrained['gFID'] / trained['gFID']:.2f}  (extractor: {trained['extractor']}, "
        f"{trained['extractor_weights']})"
    )
    chance = 1 / config["num_classes"]
    print(
        f"class probe on samples: trained {trained['probe_sample_accuracy']}, untrained "
        f"{untrained['probe_sample_accuracy']} (chance {chance:.3f}; real val {trained['probe_val_accuracy']})"
    )


if __name__ == "__main__":
    main()
