"""Data for distillation, one job per module:

    teacher_cache.py    TeacherCache: a teacher's top-k logits on disk (safetensors shards + a JSON
                        manifest), built once, read memory-mapped; CachedTeacherDataset pairs each
                        example with its cache entry, with_teacher_cache(loader, cache) a loader's
                        batches (docs/teacher_cache.md)
"""

from .teacher_cache import (
    CachedExample,
    CachedTeacherDataset,
    TeacherCache,
    TeacherCacheError,
    with_teacher_cache,
)

__all__ = ["TeacherCache", "TeacherCacheError", "CachedTeacherDataset", "CachedExample", "with_teacher_cache"]
