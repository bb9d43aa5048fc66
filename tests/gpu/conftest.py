"""Each GPU check sets the matmul precision it needs; none may leak it into the next (a float32 check
after a tf32 one would otherwise be held to the exact tolerance while running in tf32)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
