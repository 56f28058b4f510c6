"""Generated gRPC stubs of the tlt.v1 contracts (see proto/tlt/v1)."""
