"""Generated from proto/kawhi/v1/kawhi.proto by scripts/gen_grpc.py; do not edit."""
