"""--compile: a compiled run computes the eager run's losses (to float rounding: inductor fuses and
reorders the arithmetic), resumes bit for bit, and a compiler that fails costs one line, not the run."""

import os
import shutil

import pytest
import torch

from bfcl.compiling import CompileOrEager
from scripts import STEPS, assert_same_weights, final_weights, metrics, run, train_cmd

# Compiled against eager fp32, tiny run: |relative loss difference| at most 1.1e-7 over the 8 steps
# (AMD EPYC, AVX2, 2026-12-02); the bound leaves room for other CPUs' kernels.
LOSS_RTOL = 1e-5


def broken_compiler(graph, example_inputs):
    raise RuntimeError("no C++ compiler found (stand-in)")


def test_a_failing_compiler_falls_back_to_eager_with_one_line():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    said = []
    fn = CompileOrEager(layer, "the model", said.append, backend=broken_compiler)
    assert torch.equal(fn(x), layer(x))
    assert not fn.compiled and len(said) == 1
    assert said[0].startswith("warning: --compile: compiling the model failed (RuntimeError: no C++ compiler")
    assert said[0].endswith("running it eagerly") and "\n" not in said[0]
    assert torch.equal(fn(2 * x), layer(2 * x)) and len(said) == 1  # eager from then on, said once


def test_a_compiler_failing_on_a_recompile_falls_back_too():
    """A later recompile (here a new input shape; in train.py BatchFormer switching on) that fails."""
    compiles = []

    def fails_the_second_time(graph, example_inputs):
        compiles.append(1)
        if len(compiles) > 1:
            raise RuntimeError("out of memory in the compiler (stand-in)")
        return graph.forward

    torch.manual_seed(0)
    layer, said = torch.nn.Linear(4, 3), []
    fn = CompileOrEager(layer, "the model", said.append, backend=fails_the_second_time)
    x, wider = torch.randn(2, 4), torch.randn(5, 4)
    assert torch.equal(fn(x), layer(x)) and fn.compiled and not said
    assert torch.equal(fn(wider), layer(wider)) and not fn.compiled and len(compiles) == 2
    assert len(said) == 1 and "out of memory in the compiler" in said[0]


def test_a_working_compiler_is_used_and_model_errors_are_not_swallowed():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    said = []
    fn = CompileOrEager(layer, "the model", said.append, backend="eager")  # dynamo's trace-only backend
    assert torch.equal(fn(x), layer(x)) and fn.compiled and not said
    with pytest.raises(RuntimeError):  # the model's own error: raised, not a fallback
        CompileOrEager(layer, "the model", said.append, backend="eager")(torch.randn(2, 5))
    assert not said


HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler on a CPU (the fallback test covers its absence)")
def test_compiled_run_matches_eager_and_resumes_exactly(tiny_data, straight_run, tmp_path):
    """Inductor on the tiny ResNet + BatchFormer run: every loss within LOSS_RTOL of the eager run's;
    stopped at step 3 and resumed (compiling again), the losses and weights equal an uninterrupted
    compiled run's exactly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = run(train_cmd(tiny_data, straight, "--compile"), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning: --compile" not in done.stdout + done.stderr  # no fallback: it really compiled
    compiled, eager = metrics(straight), metrics(straight_run)
    assert [r["step"] for r in compiled] == list(range(1, STEPS + 1))
    for c, e in zip(compiled, eager):
        assert abs(c["loss"] - e["loss"]) <= LOSS_RTOL * abs(e["loss"]), (c["step"], c["loss"], e["loss"])

    first = run(train_cmd(tiny_data, resumed, "--compile", "--max-steps", "3"), timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run(train_cmd(tiny_data, resumed, "--compile"), timeout=900)
    assert second.returncode == 0 and "(step 3)" in second.stdout, second.stdout + second.stderr
    assert [(r["step"], r["loss"]) for r in metrics(resumed)] == [(r["step"], r["loss"]) for r in compiled]
    assert_same_weights(final_weights(resumed), final_weights(straight))
