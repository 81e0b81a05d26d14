"""Numbers out of range (issue 33, case 9): every numeric flag is checked before anything is
allocated, also values too large for a float or for a step count, and the one flag that can exhaust
memory on its own (the MLP width of projector and predictor) is refused with an estimate."""

import pytest

import train
from bfcl.errors import ConfigError
from bfcl.model import training_memory
from bfcl.runs import check_memory, check_ranges
from scripts import run, train_cmd


def test_an_integer_too_large_for_a_float_is_out_of_range():
    values = {**vars(train.parse_args(["--data", "x"])), "save_every": 10**400}
    with pytest.raises(ConfigError, match=r"--save-every .* is outside its range"):
        check_ranges(values, train.FLAG_RANGES)


@pytest.mark.parametrize("flag", ["--epochs", "--warmup-epochs", "--bf-start-epoch"])
def test_epochs_beyond_any_schedule_are_refused(flag):
    values = {**vars(train.parse_args(["--data", "x"])), flag[2:].replace("-", "_"): 1e308}
    with pytest.raises(ConfigError, match=f"{flag} 1e\\+308 is outside its range"):
        check_ranges(values, train.FLAG_RANGES)


def test_memory_estimate_counts_weights_gradients_and_momentum():
    """resnet18 (small stem), dim 32, mlp 64: the estimate against the parameters counted by hand."""
    backbone = 11_168_832  # resnet18 without fc
    projector = 512 * 64 + 2 * 64 + 64 * 32  # Linear, BN(affine), Linear; the last BN has no parameters
    predictor = 32 * 64 + 2 * 64 + 64 * 32
    trained = backbone + projector + predictor
    parameters, needed = training_memory("resnet18", "small", dim=32, mlp_dim=64)
    assert parameters == trained + backbone + projector  # the momentum encoder: a copy of the base encoder
    assert needed == 4 * (parameters + 2 * trained)  # fp32 weights, gradients of the trained ones, LARS momentum
    check_memory(needed, needed, "--moco-mlp-dim 64")  # fits exactly
    with pytest.raises(ConfigError, match=r"--moco-mlp-dim 64.*needs about 0\.\d+ GiB .*0\.01 GiB"):
        check_memory(needed, 2**30 // 100, "--moco-mlp-dim 64")


@pytest.mark.slow
def test_train_refuses_huge_flags_in_one_line(tiny_data, tmp_path):
    for extra, expected in ((["--epochs", "1e308"], "--epochs 1e+308 is outside its range"),
                            (["--moco-mlp-dim", "16000000"], "--moco-mlp-dim 16000000 with --moco-dim 32: the model")):
        result = run(train_cmd(tiny_data, tmp_path / "out", *extra))
        assert result.returncode == 1, result.stdout + result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and expected in line, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
