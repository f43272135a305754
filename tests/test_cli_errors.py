"""The one error path of the command lines (`ttt_jax.cli`): the project's own ValueErrors are
one line on stderr naming the flag, exit 2, no traceback; a ValueError raised inside a library
keeps its traceback. `python -m ttt_jax.memory`: every bad budget, size and knob is such a line
(`python -m train`: tests/train/test_train_config.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ttt_jax.cli import EXIT_USAGE, run_cli, with_flags
from ttt_jax.memory.__main__ import main
from ttt_jax.ops.core import check_positive_int


def test_own_errors_are_one_line_library_errors_are_not(capsys):
    assert (
        run_cli(lambda: check_positive_int("chunk_size", 0), fields={"chunk_size": "--chunk"}) == 2
    )
    err = capsys.readouterr().err
    assert err == "error: chunk_size must be a positive int, got 0 (--chunk)\n"
    with pytest.raises(ValueError, match="cannot reshape"):  # numpy's, not the project's
        run_cli(lambda: np.zeros(3).reshape(2, 2))
    assert run_cli(lambda: None) == 0 and run_cli(lambda: 3) == 3
    assert run_cli(lambda: (_ for _ in ()).throw(KeyError("x")), codes={KeyError: 7}) == 7
    assert EXIT_USAGE == 2


def test_messages_get_the_flag_of_the_field_they_name():
    fields = {"OptimConfig.": "--optim.", "num_heads": "--model.num-heads"}
    assert with_flags("OptimConfig.b1 must be in [0, 1)", fields).endswith("(--optim.b1)")
    assert with_flags("d_model=128 is not divisible by num_heads=3", fields).endswith(
        "(--model.num-heads)"
    )
    assert with_flags("pass --fresh to start over", fields) == "pass --fresh to start over"
    assert with_flags("nothing to map", fields) == "nothing to map"


MEMORY_CASES = [
    ("plan --layer ttt_linear --budget 2XB", "argument --budget: '2XB' is not a size"),
    ("plan --layer ttt_linear --budget=-1GiB", "argument --budget: '-1GiB' is not a size"),
    ("plan --layer ttt_linear --budget 0", "argument --budget: '0' is not a size > 0"),
    ("plan --layer ttt_linear --budget 1e400GiB", "argument --budget: '1e400GiB' is not a size"),
    ("plan --layer ttt_linear --budget nanGiB", "argument --budget: 'nanGiB' is not a size"),
    ("plan --layer ttt_linear --budget 1GiB --search batch --seq 0", "argument --seq: '0'"),
    ("report --layer ttt_linear --seq 0", "argument --seq: '0' is not a positive int"),
    ("report --layer ttt_linear --batch 0", "argument --batch: '0' is not a positive int"),
    ("report --layer ttt_linear --d-model -8", "argument --d-model: '-8' is not a positive"),
    ("report --layer ttt_linear --mini-batch 0", "argument --mini-batch: '0' is not a positive"),
    ("report --layer lact --chunk 0", "argument --chunk: '0' is not a positive int"),
    ("report --layer npt --d-ff 0", "argument --d-ff: '0' is not a positive int"),
    ("report --layer ttt_linear --checkpoint-group 0", "argument --checkpoint-group: '0'"),
    ("report --layer ttt_linear --remat-policy bogus", "argument --remat-policy: remat_policy="),
    ("report --model tiny --block-remat bogus", "argument --block-remat: remat_policy='bogus'"),
    ("report --layer ttt_linear --heads 5", "num_heads=5 (--d-model, --heads)"),
    ("report --layer lact --heads 7", "(--d-model, --heads)"),
    ("report --layer ttt_linear --backward custom", "backward='custom' applies to"),
    ("report --layer npt --checkpoint-group 2", "has no scan"),
    ("report --baseline", "--baseline and --block-remat need --model"),
    (
        "report --layer ttt_linear --checkpoint-group 2 --remat-policy save_names:nonexistent",
        "'nonexistent'",
    ),
]


@pytest.mark.parametrize("argv,message", MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_memory_cli_errors_are_one_line(capsys, argv, message):
    try:
        code = main(argv.split())
    except SystemExit as exit_:  # argparse's own errors (also exit 2, also one line)
        code = exit_.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
