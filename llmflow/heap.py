"""The heap of a long-running process: what it holds once started it holds to the end."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move what is alive once a process has started (modules, models, the app) out of the
    cyclic collector's reach, so a full collection no longer walks it. Before, one stalled
    the event loop under load: 93 ms in a worker, 62 and 99 ms in `llmflow serve`
    (gc.callbacks)."""
    gc.collect()
    gc.freeze()
