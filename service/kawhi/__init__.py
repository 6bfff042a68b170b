"""kawhi: KAWHI reward shaping for RL of vision-language models.

The engine (``kawhi.engine``) is a library a trainer can use in-process; the server,
CLI and gRPC front ends are thin shells around it.
"""

__version__ = "0.1.0"
