"""Vision-critical attention heads (docs/method.md §3): which heads a model has, where the set
came from, and the offline causal test that finds a set for a model that has none.

* :mod:`kawhi.heads.identity` — a model's identity (architecture and shape), read from
  its config, never from its folder name;
* :mod:`kawhi.heads.presets` — the published head sets, keyed by identity;
* :mod:`kawhi.heads.files` — heads files (``--heads-file``, ``kawhi_heads.json`` in the
  model folder) and the one resolution rule: file > folder file > published > all;
* :mod:`kawhi.heads.masking`, :mod:`kawhi.heads.scoring`, :mod:`kawhi.heads.stats`,
  :mod:`kawhi.heads.discover` — ``kawhi heads discover``;
* :mod:`kawhi.heads.synthetic` — a small labelled synthetic VQA set (charts, geometry).
"""
