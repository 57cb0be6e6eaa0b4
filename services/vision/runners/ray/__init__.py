"""`vision serve --runner ray`: the Ray Serve deployments, their batching on the shared plan, gRPC services and the driver."""
