"""LoLA's sparse global cache: scores and eviction (``naive``), the chunk reference (``chunk``)."""

from lolcats.ops.sparse.naive import SCORES, evict_to_cache, get_score, merge_candidates, register_score

__all__ = ["SCORES", "evict_to_cache", "get_score", "merge_candidates", "register_score"]
