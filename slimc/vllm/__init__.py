"""slimc inside vLLM: the plugin vLLM loads (`plugin`), the per-layer model classes it builds on vLLM's Llama
blocks (`model`), the plain-Python mapping of a slimc checkpoint onto them (`mapping`), and `slimc bench --runtime
vllm` (`bench`). Importing this package imports none of them, and so neither vLLM nor torch."""
