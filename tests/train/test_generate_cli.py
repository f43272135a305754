"""`python -m train.generate` (issue 19 part 5) on a micro run made by `python -m train`: it
restores the verified checkpoint and prints what `ttt_jax.models.generate` gives for the
restored model; user errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests._train_helpers import MICRO_ARGS, ROOT, env, train

# MQAR runs have a vocab of 32: a prompt of bytes below 32 is in it (bytes tokenizer).
PROMPT = "\x01\x05\x03\x07"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    train([*MICRO_ARGS, "--steps", "2", "--run-dir", str(path)])
    return path


def test_generate_prints_the_restored_models_continuation(run_dir):
    from train.generate import load_run
    from ttt_jax.data.tokenizer import make_tokenizer
    from ttt_jax.models.generate import generate

    proc = subprocess.run(
        [sys.executable, "-m", "train.generate", "--run-dir", str(run_dir), "--prompt", PROMPT,
         "--max-new-tokens", "6"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg, model, step = load_run(str(run_dir))
    assert step == 2
    tok = make_tokenizer(cfg.data.tokenizer)
    want = tok.decode(generate(model, tok.encode(PROMPT), 6))
    assert proc.stdout == want + "\n"
    assert len(np.asarray(tok.encode(want))) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompt", "hello"], "outside the model's vocab of 32"),
        (["--run-dir", "/nonexistent/run"], "is not a directory"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(run_dir, capsys, args, message):
    from train.generate import main

    base = {"--run-dir": str(run_dir), "--prompt": PROMPT}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    code = main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
