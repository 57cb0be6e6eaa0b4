"""The Task contract and one pure module per task: model outputs to domain results in vectorised numpy, no protobuf or gRPC."""
