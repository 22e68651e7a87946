"""Long-context accuracy evaluation: RULER-style synthetic tasks generated
locally (:mod:`kvstore.evaluation.tasks`), run by ``kvstore eval``
(:mod:`kvstore.benchmarks.longeval`)."""
from __future__ import annotations

from .tasks import FILLER, HAYSTACKS, KINDS, Task, count_tokens, make_task, score

__all__ = ["FILLER", "HAYSTACKS", "KINDS", "Task", "count_tokens", "make_task", "score"]
