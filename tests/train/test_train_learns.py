"""The models learn within a CPU budget: the tiny preset on the embedded stdlib corpus (the
README's main job, shortened) and a small TTT model on MQAR, whose recall accuracy must beat
chance by more than the evaluation's own noise."""

from __future__ import annotations

import math

from tests._train_helpers import metrics, train


def test_tiny_preset_loss_falls_on_the_stdlib_corpus(tmp_path):
    proc = train(["--steps", "60", "--log.eval-every", "60", "--checkpoint.every", "60", "--log.every", "1",
                  "--log.no-progress", "--log.no-tensorboard", "--run-dir", str(tmp_path)])  # fmt: skip
    assert "model: tiny" in proc.stdout and "data: stdlib" in proc.stdout
    assert "train loss (steps 1-10 -> last 10)" in proc.stdout  # the summary table
    log = metrics(tmp_path)
    uniform = math.log(256)  # bytes: a model that knows nothing
    assert log[0]["step"] == 1 and log[0]["loss"] > 0.9 * uniform
    assert log[-1]["step"] == 60 and log[-1]["eval_loss"] < 0.6 * uniform


def test_ttt_model_recalls_mqar_above_chance(tmp_path):
    pairs, seq, batch, evals = 4, 32, 32, 16
    train(["--model.d-model", "64", "--model.num-heads", "2", "--model.d-ff", "128",
           "--model.num-layers", "2", "--model.ttt.mini-batch-size", "8", "--data.source", "mqar",
           "--data.mqar-pairs", str(pairs), "--data.mqar-vocab", "32", "--seq", str(seq),
           "--batch-size", str(batch), "--steps", "150", "--optim.lr", "1e-2",
           "--log.eval-every", "150", "--log.eval-batches", str(evals), "--log.no-progress",
           "--log.no-tensorboard", "--checkpoint.every", "150", "--run-dir", str(tmp_path)])  # fmt: skip
    accuracy = metrics(tmp_path)[-1]["eval_accuracy"]
    # Chance is 1/P: answering with any one of the P values in the context. The margin is three
    # standard errors of an accuracy measured on this many scored queries.
    chance = 1 / pairs
    queries = evals * batch * ((seq + 1 - 2 * pairs) // 2)
    assert accuracy > chance + 3 * math.sqrt(chance * (1 - chance) / queries)
