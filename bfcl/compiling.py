"""`--compile`: torch.compile (inductor) with a one-line fallback to eager where compiling fails.

torch.compile is lazy: nothing is compiled until the first call (or a recompile, as when
BatchFormer switches on at --bf-start-epoch), and that is where a machine without a working C++
compiler (CPU) or Triton (GPU) fails. `CompileOrEager` compiles, and if a forward call fails to
compile it says so in one line and calls the eager function from then on. Only compiler failures
fall back: an error in the model's own code is raised as it would be eagerly. Not covered: a
backward graph that compiles (lazily, at the first backward) where its forward did not fail, and
processes that fail differently (the failing one repeats DDP's buffer broadcast: a hang). Where
the failing graph follows a graph break, the code before the break has run once already on that
call; MoCo's forward has no break (torch._dynamo.explain: one graph for a ResNet-18 with and
without BatchFormer).

Measured (bench/speed.py --only compile): on 2 AVX2 cores a compiled ResNet-18 step runs 1.15x
faster than eager once warm, but a cold compile takes about 2.5 minutes, so --compile is off by
default (docs/results.md#speed).
"""

from collections.abc import Callable

import torch
import torch._inductor.config
from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, TritonUnavailableError

COMPILER_FAILURES = (BackendCompilerFailed, InternalTorchDynamoError, TritonUnavailableError)


def reason(e: Exception) -> str:
    """The compiler's own error, first line: dynamo wraps it (BackendCompilerFailed.inner_exception)."""
    cause = getattr(e, "inner_exception", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:160]}" if lines else type(cause).__name__


class CompileOrEager:
    """Calls torch.compile(fn); on a compiler failure, `say`s one line and calls fn itself for
    that call and every later one. `compiled` tells which is in use."""

    def __init__(self, fn: Callable, name: str, say: Callable[[str], None] = print, backend="inductor"):
        self.eager, self.name, self.say = fn, name, say
        # Inductor draws random numbers (BatchFormer's dropout) from its own generator unless told
        # to use eager's: with it, a compiled run computes what the eager run computes.
        torch._inductor.config.fallback_random = True
        self.compiled_fn = torch.compile(fn, backend=backend)
        self.compiled = True

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled_fn(*args, **kwargs)
        except COMPILER_FAILURES as e:
            self.say(f"warning: --compile: compiling {self.name} failed ({reason(e)}); running it eagerly")
            self.compiled = False
            return self.eager(*args, **kwargs)
