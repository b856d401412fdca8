import gc
from collections.abc import Iterator

import pytest


@pytest.fixture
def thawed_heap() -> Iterator[None]:
    """No object frozen before the test or after it: tests of `gc.freeze()` freeze the test
    process's own heap."""
    gc.unfreeze()
    yield
    gc.unfreeze()
