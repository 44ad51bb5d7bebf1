"""Data for distillation, one job per module:

    teacher_cache.py    TeacherCache: a teacher's top-k logits on disk (safetensors shards + a JSON
                        manifest), built once, read memory-mapped; CachedTeacherDataset pairs each
                        example with its cache entry (docs/teacher_cache.md)
"""

from .teacher_cache import CachedExample, CachedTeacherDataset, TeacherCache, TeacherCacheError

__all__ = ["TeacherCache", "TeacherCacheError", "CachedTeacherDataset", "CachedExample"]
