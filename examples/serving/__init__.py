"""The serving demo's parts (examples/generate_paged.py runs them):

- ``model``: the random-weight decoder-only transformer; attention is a callback.
- ``pages``: the page allocator of the KV-cache pool.
- ``scheduler``: admission (first come, first served, as pages allow) and continuous batching.
- ``attention``: the backend interface (flash_attn_with_kvcache's signature) and the reference
  wrapped in it, for the CPU tests.
- ``paged_engine``: the paged path (chunked prefill, batched decode, one attention call per
  layer and step).
- ``padded_baseline``: static batches over contiguous padded caches with SDPA, and the
  teacher-forced recomputation of any path's logits.
- ``requests``: requests, results, the random request queue.
"""
