"""What differs between the transformers releases slimc supports (5.17 onwards), in one place.

The KV cache keyword: transformers named it `past_key_values` in every model, layer and attention forward up
to 5.19 at least, then `cache` (5.25: the old name warns, and goes in 5.40). slimc passes whichever the
installed release's signature has, and filters both out where it replays a decoder block without a cache.
"""
import inspect

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_kwarg(forward) -> str:
    """The KV cache's keyword in `forward` (a model's or a layer's), as the installed transformers names it."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """Keyword arguments that run `model` on (and grow) a KV cache."""
    return {cache_kwarg(model.forward): cache, "use_cache": True}
