"""The gRPC front end (kawhi.v1.Kawhi, grpc.health.v1.Health, server reflection).

A thin shell over the same request pipeline, batcher, caches, limits, auth and
metrics as the HTTP routes: it runs on the HTTP server's event loop and shares its
``ServerState`` (``kawhi.grpc.server.attach``). The stubs and the message <-> wire
conversion live in the client package (``kawhi_client.grpc``), so both ends use one.
"""
