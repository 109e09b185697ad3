"""The suite's own isolation (tests/conftest.py): what one test changes in torch's global
settings does not reach the tests after it. The two tests run in this order (pytest keeps a
module's order); the second fails if the first's change leaks."""

import torch


def test_a_test_may_turn_tf32_on():
    torch.backends.cuda.matmul.allow_tf32 = True  # as `walsh bench layer` does, in-process
    assert torch.get_float32_matmul_precision() == "high"


def test_the_next_test_finds_tf32_as_the_suite_began():
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
