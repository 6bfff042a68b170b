"""Vision-critical attention heads (docs/method.md §3): which heads a model has and where the set came from.

* :mod:`kawhi.heads.identity` — a model's identity (architecture and shape), read from
  its config, never from its folder name;
* :mod:`kawhi.heads.presets` — the published head sets, keyed by identity;
* :mod:`kawhi.heads.files` — heads files (``--heads-file``, ``kawhi_heads.json`` in the
  model folder) and the one resolution rule: file > folder file > published > all.

The engine reads head sets from here; the offline causal test that finds a set for a
model that has none (``kawhi heads discover``) runs the engine, so it lives a room
above it, in :mod:`kawhi.discovery`.
"""
