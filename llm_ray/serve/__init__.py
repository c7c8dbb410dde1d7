"""OpenAI-compatible serving on Ray Serve: continuous batching on our DecoderLM, CPU or GPU.

``engine.py`` (the batching loop), ``batch_cache.py`` (KV cache for a changing set of rows),
``openai_api.py`` (request/response shapes, validation, errors), ``text_stream.py`` (token ids ->
text deltas, stop strings), ``metrics.py`` (Ray metrics), ``app.py`` (the Serve deployment).
Importing this package imports neither torch nor ray; import the submodules.
"""
