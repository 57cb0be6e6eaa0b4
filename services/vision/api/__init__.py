"""The gRPC surface: error mapping to status codes, protobuf codecs, and one servicer per service."""
