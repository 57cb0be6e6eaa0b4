"""Client side of the gRPC API: one channel factory, the CLI's client commands, Features/DELF helpers."""
