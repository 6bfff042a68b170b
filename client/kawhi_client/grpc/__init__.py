"""The KAWHI service over gRPC (``pip install 'kawhi-rl[grpc]'``: grpcio + protobuf, no torch).

``GrpcClient`` has ``Client``'s methods, results and retry policy; ``convert`` maps wire
objects to kawhi.v1 messages and back (the server uses it too); ``status`` maps the
error catalogue to google.rpc statuses. The stubs in ``_proto`` are generated from
proto/kawhi/v1/kawhi.proto by scripts/gen_grpc.py.
"""

from kawhi_client.grpc.client import GrpcClient

__all__ = ["GrpcClient"]
