"""Generated gRPC stubs of velo.v1."""
