"""``kawhi heads discover``: the offline causal test that finds the vision-critical heads of a
model that has no published set (docs/heads.md). It runs the engine, so it sits above it.

* :mod:`kawhi.discovery.masking`, :mod:`kawhi.discovery.scoring`, :mod:`kawhi.discovery.stats`,
  :mod:`kawhi.discovery.discover` — the test;
* :mod:`kawhi.discovery.synthetic` — a small labelled synthetic VQA set (charts, geometry);
* :mod:`kawhi.discovery.cli` — the ``kawhi heads`` command.
"""
