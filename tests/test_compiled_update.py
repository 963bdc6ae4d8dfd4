"""The batched client update's compilation (fedmaml/client/update.py ``CompiledUpdate``): where
inductor cannot compile (no C++ compiler on the machine), the update is traced with ``aot_eager``
instead of running eagerly, with the same numbers."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config

from fedmaml.client.update import CompiledUpdate


def update(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.func.vmap(lambda xi, wi: torch.tanh(xi @ wi).sum())(x, w)


def test_without_a_cxx_compiler_the_update_is_traced_not_run_eagerly(tmp_path, monkeypatch,
                                                                      caplog):
    # a machine without a C++ compiler, and nothing compiled before (an empty cache)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    x, w = torch.randn(5, 3, 4), torch.randn(5, 4, 2)
    compiled = CompiledUpdate(update, True, "test")
    try:
        with caplog.at_level(logging.WARNING, logger="fedmaml"):
            first = compiled(x, w)
            second = compiled(x * 2, w)
    finally:
        torch._dynamo.reset()
    assert compiled.backend == "aot_eager"
    torch.testing.assert_close(first, update(x, w))
    torch.testing.assert_close(second, update(x * 2, w))
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "inductor" in failed[0] and "aot_eager" in failed[0]


def test_an_update_no_backend_takes_runs_eagerly_and_its_own_error_surfaces(caplog):
    def refuses(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("the update's own error")

    compiled = CompiledUpdate(refuses, True, "test")
    try:
        with caplog.at_level(logging.WARNING, logger="fedmaml"), \
                pytest.raises(ValueError, match="the update's own error"):
            compiled(torch.ones(3))
    finally:
        torch._dynamo.reset()
    assert compiled.backend == "eager"
    tried = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert ["(inductor)" in tried[0], "(aot_eager)" in tried[1], len(tried)] == [True, True, 2]


def test_disabled_is_eager():
    compiled = CompiledUpdate(update, False, "test")
    x, w = torch.randn(2, 3, 4), torch.randn(2, 4, 2)
    assert torch.equal(compiled(x, w), update(x, w)) and compiled.backend == "eager"
