"""The gRPC front end (kawhi.v1.Kawhi, grpc.health.v1.Health, server reflection).

gRPC framing only, over the same serving core as HTTP (kawhi.pipeline.service:
admission, idempotency, batcher, caches, deadlines, drain, image store): it runs on
the HTTP server's event loop and shares its ``ReweightService``
(``kawhi.grpc.server.attach``, called by ``kawhi serve``). It imports nothing from
kawhi.server. The stubs and the message <-> wire
conversion live in the client package (``kawhi_client.grpc``), so both ends use one.
"""
