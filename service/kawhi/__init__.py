"""kawhi: KAWHI reward shaping for RL of vision-language models.

The engine (``kawhi.engine``) is a library a trainer can use in-process; the server,
CLI and gRPC front ends are thin shells around it. The distribution is ``kawhi-rl``
(``pip install kawhi-rl``); the PyPI name ``kawhi`` is an unrelated project.
"""

__version__ = "0.1.0"

# Installed as the distribution ``kawhi-rl``: warn when the unrelated PyPI ``kawhi`` shares this module name.
from kawhi_client.distribution import warn_if_foreign_kawhi

warn_if_foreign_kawhi()
