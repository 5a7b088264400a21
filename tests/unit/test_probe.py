"""The class probe (restok.probe): logistic regression on frozen features, its accuracies and its reliability flag.

Run: .venv/bin/python -m pytest tests/unit/test_probe.py -q

Features are synthetic Gaussian clusters (one mean per class), so the right answers are known: well separated
clusters are classified almost perfectly, pure noise at chance, and a probe at chance on real val images is
flagged as not reliable whatever it says about samples.
"""

import numpy as np
import pytest

from restok.probe import class_probe_report, first_per_class, fit_probe, probe_accuracy

C, D = 4, 32


def clusters(n_per_class: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(C, D)) * 3  # the same class means for every split
    labels = np.repeat(np.arange(C), n_per_class)
    return means[labels] + spread * rng.normal(size=(len(labels), D)), labels


def test_separable_classes_are_learned_and_reported_per_class():
    probe = fit_probe(*clusters(20, 1.0, seed=1), num_classes=C)
    out = probe_accuracy(probe, *clusters(10, 1.0, seed=2))
    assert out["accuracy"] > 0.95 and out["count"] == 40
    assert set(out["per_class"]) == {"0", "1", "2", "3"} and min(out["per_class"].values()) > 0.8


def test_fit_is_deterministic():
    a = fit_probe(*clusters(10, 2.0, seed=1))
    b = fit_probe(*clusters(10, 2.0, seed=1))
    assert np.array_equal(a.weight.numpy(), b.weight.numpy())


def test_per_class_accuracy_counts_each_class_alone():
    probe = fit_probe(*clusters(20, 0.5, seed=1), num_classes=C)
    feats, labels = clusters(5, 0.5, seed=3)
    wrong = labels.copy()
    wrong[labels == 2] = 3  # class 2 images labelled 3: all of "3" among them are wrong
    out = probe_accuracy(probe, feats[labels >= 2], wrong[labels >= 2])
    assert out["per_class"]["0"] is None and out["per_class"]["3"] == 0.5 and out["accuracy"] == 0.5


def test_report_reliable_only_when_real_val_is_classified():
    train = clusters(20, 1.0, seed=1)
    val, samples = clusters(10, 1.0, seed=2), clusters(5, 1.0, seed=3)
    good = class_probe_report(fit_probe(*train), *val, *samples, features="fixture")
    assert good["reliable"] and good["chance"] == 0.25 and good["real_val_accuracy"] > 0.95
    assert good["per_class"]["1"].keys() == {"real_val", "samples"} and good["features"] == "fixture"
    assert good["recon_accuracy"] is None  # no reconstructions given

    feats, labels = clusters(10, 1.0, seed=4)
    wrong = (labels + 1) % 4  # reconstructions that show the next class: accuracy 0, not the samples' figure
    probe = fit_probe(*train)
    with_recon = class_probe_report(probe, *val, *samples, features="fixture", recon_feats=feats, recon_labels=wrong)
    assert with_recon["recon_accuracy"] == probe_accuracy(probe, feats, wrong)["accuracy"] < 0.05
    assert with_recon["sample_accuracy"] == good["sample_accuracy"]

    noise = np.random.default_rng(5).normal(size=(80, D))  # features that carry no class
    blind = fit_probe(noise, train[1])
    bad = class_probe_report(blind, np.random.default_rng(6).normal(size=(40, D)), val[1], *samples, features="x")
    assert not bad["reliable"] and bad["note"].startswith("NOT RELIABLE") and bad["real_val_accuracy"] < 0.625


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_probe(np.zeros((4, 3)), np.array([0, 1, 2, 3]), num_classes=2)
    with pytest.raises(ValueError, match="needs \\(N, D\\) features"):
        fit_probe(np.zeros((4, 3)), np.array([0, 1]))


def test_first_per_class_keeps_shard_order():
    assert first_per_class([2, 0, 2, 2, 1, 0, 0], 2).tolist() == [0, 1, 2, 4, 5]
    assert first_per_class([], 3).tolist() == [] and first_per_class([1, 1], 0).tolist() == []
