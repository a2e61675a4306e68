"""The evaluators' figures: the label sets' true labellers and the fidelity figures (Frechet, its floor, KID)."""

from __future__ import annotations

import torch

from ctrl.datamodules import digits_split
from ctrl.datamodules.labelsets import boundaries, compression_bytes, offline_split, true_labels
from ctrl.evaluation import DigitsEvaluator, LabelSetEvaluator, classification_scores


def test_compressibility_classes_have_a_margin_and_count_wrong_there():
    """Two classes at the terciles of the real data's compression measure: a third of the images each,
    the middle third (the margin) judged as no class, which is wrong for either request."""
    images, _ = digits_split("pretrain")
    judged = true_labels("compressibility", images)
    shares = torch.bincount(judged, minlength=3).float() / len(images)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.02), shares
    low, high = boundaries("compressibility").tolist()
    assert high - low > 15  # bytes: the margin is wider than the header noise that sank the old quartiles
    sizes = compression_bytes(images)
    assert (sizes[judged == 0] <= low).all() and (sizes[judged == 1] > high).all()
    x, y = offline_split("compressibility", "heldout")
    assert set(y.tolist()) == {0, 1} and len(x) < len(digits_split("heldout")[0])
    margin = images[judged == 2][:4]
    scores = classification_scores(true_labels("compressibility", margin), torch.tensor([0, 1, 0, 1]), 2)
    assert scores["accuracy"] == 0 and scores["confusion"].tolist() == [[0, 0, 2], [0, 0, 2]]
    # multi-task: a sample in the compressibility margin is wrong as a pair, whatever its ink
    evaluator = LabelSetEvaluator(["compressibility", "ink"], num_features=4)
    ink = true_labels("ink", margin)
    metrics = evaluator.evaluate(margin, ink)  # condition = compressibility 0 with the sample's true ink
    assert metrics["accuracy"] == 0 and metrics["ink_accuracy"] == 1 and metrics["compressibility_accuracy"] == 0


def test_fidelity_comes_with_its_floor_and_an_unbiased_kernel_distance():
    evaluator = DigitsEvaluator()
    real, noise = evaluator.pretrain[:300], torch.rand(300, 1, 16, 16) * 2 - 1
    floor = evaluator.frechet_floor(300)
    assert torch.equal(floor, evaluator.frechet(real))  # the floor: real digits at the same n
    assert evaluator.frechet_floor(60) > floor + 0.5  # Frechet is biased upwards at small n
    state = torch.get_rng_state()
    kid_real, kid_noise = evaluator.kid(real), evaluator.kid(noise)
    assert torch.equal(state, torch.get_rng_state())  # its subsets come from a seed of its own
    assert torch.equal(kid_real, evaluator.kid(real))
    assert abs(float(kid_real)) < 0.05 * float(kid_noise), (kid_real, kid_noise)  # about 0 for real digits
    assert abs(float(evaluator.kid(evaluator.pretrain[:60]))) < 0.05 * float(kid_noise)  # at small n too
    metrics = evaluator.evaluate(real, torch.zeros(300, dtype=torch.long))
    assert {"frechet", "frechet_floor", "kid"} <= set(metrics)
