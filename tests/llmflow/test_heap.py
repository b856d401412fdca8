import gc
import weakref

from llmflow.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.me = self


def test_the_startup_heap_is_collected_then_frozen(thawed_heap: None) -> None:
    """Garbage is collected first (freezing it would keep it for good), then what is left
    is out of the collector's reach: a full collection no longer walks it."""
    cycle = Node()
    dead = weakref.ref(cycle)
    del cycle
    try:
        gc.disable()
        freeze_startup_heap()
        assert dead() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.enable()
