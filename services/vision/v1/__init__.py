"""Generated protobuf and gRPC code of the vision.v1 API (scripts/gen_protos.py); never edited by hand."""
