"""The KAWHI service over gRPC (``pip install 'kawhi-rl[grpc]'``: grpcio + protobuf, no torch).

``GrpcClient`` and ``AsyncGrpcClient`` run on ``Client``'s sans-I/O core (``kawhi_client.core``):
the same methods, results, retry policy, replicas and failover; ``convert`` maps wire
objects to kawhi.v1 messages and back (the server uses it too); ``status`` maps the
error catalogue to google.rpc statuses. The stubs in ``_proto`` are generated from
proto/kawhi/v1/kawhi.proto by scripts/gen_grpc.py.
"""

from kawhi_client.grpc.aio import AsyncGrpcClient
from kawhi_client.grpc.client import GrpcClient

__all__ = ["AsyncGrpcClient", "GrpcClient"]
