"""LoLA's sparse global cache: scores and eviction (``cache``, every path's), the chunk reference (``naive``)."""

from lolcats.ops.sparse.cache import SCORES, evict_to_cache, get_score, merge_candidates, register_score

__all__ = ["SCORES", "evict_to_cache", "get_score", "merge_candidates", "register_score"]
