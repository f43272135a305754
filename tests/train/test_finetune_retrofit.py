"""Fine-tuning a retrofitted Hugging Face checkpoint (issue 19 part 4): a tiny random Llama built
with `transformers` and a BPE tokenizer built with `tokenizers` (nothing downloaded) are saved
into a directory; `python -m train --init-from DIR` reads a text file with that tokenizer,
retrofits In-Place TTT into layer 0's MLP and a gated TTT-Linear branch into layer 1, and trains
only the new parameters: the loss decreases, the pretrained weights are unchanged and the new
ones moved. Stopped halfway, the run resumes from its own checkpoint (the checkpoint's weights
are deleted in between, so reading them again would fail). Misused flags are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

from tests._train_helpers import final_params, metrics, train  # noqa: E402
from train.__main__ import main  # noqa: E402
from ttt_jax.convert import load_pretrained  # noqa: E402


def _checkpoint(tmp_path):
    """A tiny Llama with its tokenizer, and a text file to fine-tune on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = [("quick", "cat", "red"), ("lazy", "dog", "blue"), ("small", "bird", "green")] * 200
    text = " ".join(f"the {a} {b} sat on the {c} mat number {i % 7}." for i, (a, b, c) in
                    enumerate(words))  # fmt: skip
    data = tmp_path / "train.txt"
    data.write_text(text)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=384, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    path = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() <= 384
    return path, data


@pytest.mark.slow
def test_retrofitted_llama_fine_tunes_only_new_params_and_resumes(tmp_path, capsys):
    path, data = _checkpoint(tmp_path)
    run = tmp_path / "run"
    base = ["--init-from", str(path), "--data.source", "text", "--data.path", str(data)]
    args = [
        *base, "--model.precision", "fp32", "--model.retrofit.inplace-layers", "0",
        "--model.retrofit.branch-layers", "1", "--model.inplace.chunk-size", "8",
        "--model.ttt.mini-batch-size", "8", "--model.ttt.checkpoint-group", "None",
        "--model.ttt.unroll", "1", "--only-new-params", "--seq", "32", "--batch-size", "4",
        "--steps", "16", "--checkpoint.every", "8", "--log.every", "1", "--log.eval-every", "8",
        "--log.eval-batches", "1", "--optim.warmup-steps", "1", "--optim.lr", "3e-2",
        "--log.no-progress", "--log.no-tensorboard", "--run-dir", str(run),
    ]  # fmt: skip

    # Flags that would not keep the pretrained weights, or train nothing, are one-line errors.
    bad = [
        ([*args, "--model.d-model", "64"], "--model.d-model is decided by the --init-from"),
        ([*args, "--preset", "tiny"], "--preset and --init-from both choose the model"),
        (["--init-from", str(path)], "the stdlib corpus is raw bytes"),
        ([*base, "--only-new-params"], "the model has no retrofit"),
        (["--only-new-params"], "only_new_params needs init_from"),
    ]
    for argv, message in bad:
        code = main(argv)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)

    _, pretrained = load_pretrained(path)
    first = train([*args, "--stop-after", "8"])
    assert "initialised from" in first.stdout and "retrofit: In-Place TTT MLP in layers [0]" in (
        first.stdout
    )
    (path / "model.safetensors").unlink()  # a resumed run must not read the checkpoint again
    second = train(args)
    assert "resumed from step 8" in second.stdout

    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 17))
    loss = [r["loss"] for r in records]
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 0.3, loss
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0], evals

    final = final_params(run, 16)
    blocks, old = final["groups"]["blocks"], pretrained["groups"]["blocks"][0]

    def block(i):
        return blocks[i] if i in blocks else blocks[str(i)]

    # Frozen: the pretrained weights, where the retrofit placed them (layer l at position l).
    for name in ("embed", "head", "final_norm"):
        np.testing.assert_array_equal(final[name], np.asarray(pretrained[name]))
    for layer in (0, 1):
        for name, x in old["mixer"].items():
            np.testing.assert_array_equal(block(layer)["mixer"][name][0], np.asarray(x[layer]))
    mlp = block(0)["mlp"]
    np.testing.assert_array_equal(mlp["w_gate"][0], np.asarray(old["mlp"]["W_gate"][0]))
    np.testing.assert_array_equal(mlp["w_down"][0], np.asarray(old["mlp"]["W_down"][0]).T)
    np.testing.assert_array_equal(block(1)["mlp"]["W_up"][0], np.asarray(old["mlp"]["W_up"][1]))
    # New: the gate opened, the branch and the In-Place conv moved off their init.
    assert np.abs(block(1)["branch_gate"]).max() > 0
    assert np.abs(mlp["ttt_conv"]).max() > 0
