"""A fresh classifier starts at the training labels' prior (finetuning.heads.set_prior_bias), and only a fresh one."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetuning.config import NERConfig
from finetuning.heads import set_prior_bias


def _bias_grad(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    classifier.zero_grad()
    F.cross_entropy(classifier(features), labels).backward()
    return classifier.bias.grad.clone()


def test_prior_bias_is_the_smoothed_log_frequency_and_cancels_the_common_mode_gradient():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 900 + [1] * 60 + [2] * 40)  # a sparse NER set: 9 in 10 tokens are "O"
    features = torch.randn(len(labels), 16) * 6
    classifier = nn.Linear(16, 3)
    nn.init.normal_(classifier.weight, std=0.02)  # BERT's init
    nn.init.zeros_(classifier.bias)
    zero_grad = _bias_grad(classifier, features, labels)
    # From uniform logits the mean gradient pushes "O" up by ~0.57 and each entity class down: the all-"O" pull.
    assert zero_grad[0] < -0.5 and zero_grad[1] > 0.25 and zero_grad[2] > 0.25

    prior = set_prior_bias(classifier, [-100, *labels.tolist(), -100])  # -100 (unlabelled subwords) is not a class
    assert prior == pytest.approx([901 / 1003, 61 / 1003, 41 / 1003])
    assert classifier.bias.tolist() == pytest.approx([math.log(p) for p in prior], rel=1e-6)
    # At the prior the bias gradient is only the smoothing and the weights' tiny logits: no common-mode pull.
    assert _bias_grad(classifier, features, labels).abs().max() < 0.03


def test_a_class_absent_from_training_gets_a_finite_bias():
    classifier = nn.Linear(4, 3)
    prior = set_prior_bias(classifier, [0, 0, 1])
    assert prior == pytest.approx([3 / 6, 2 / 6, 1 / 6]) and torch.isfinite(classifier.bias).all()


def _tiny_ner(path):
    path.mkdir()
    sentence = "Patients with {} had {} .\n"
    rows = []
    for i, (a, b) in enumerate([("cancer", "fever"), ("asthma", "pain"), ("colitis", "cough")] * 4):
        for token in sentence.format(a, b).split():
            rows.append(f"{token}\t{'B-Disease' if token == a and i % 2 == 0 else 'O'}\n")
        rows.append("\n")
    (path / "train.tsv").write_text("".join(rows))
    return path


def test_ner_records_the_prior_and_keeps_a_trained_classifier(minilm_dir, tmp_path):
    from finetuning.ner import main

    data = _tiny_ner(tmp_path / "data")
    common = dict(data=str(data), epochs=1, batch_size=4, num_threads=1, progress=False, do_eval=False,
                  do_predict=False, report_to=["none"])
    first = main(NERConfig(model=str(minilm_dir), output_dir=str(tmp_path / "a"), **common))
    labels = first["labels"]
    assert labels == ["O", "B-Disease", "I-Disease"]
    # 12 sentences of 6 words, 6 with one B-Disease; each word's first subword is labelled: (66+1, 6+1, 0+1) / 75.
    assert first["classifier_prior"] == pytest.approx([67 / 75, 7 / 75, 1 / 75])
    assert "classifier_prior" in json.loads((tmp_path / "a/metrics.json").read_text())

    zero = main(NERConfig(model=str(minilm_dir), output_dir=str(tmp_path / "z"), classifier_bias="zero", **common))
    assert "classifier_prior" not in zero

    from safetensors.torch import load_file

    trained = load_file(tmp_path / "a/model/model.safetensors")["classifier.bias"]
    # Fine-tuning further from a model that already has this label set's classifier starts from that classifier.
    again = main(NERConfig(model=str(tmp_path / "a/model"), output_dir=str(tmp_path / "b"), learning_rate=1e-12,
                           **common))
    assert "classifier_prior" not in again
    continued = load_file(tmp_path / "b/model/model.safetensors")["classifier.bias"]
    assert torch.allclose(continued, trained, atol=1e-6)
