"""One module per task: model outputs → domain results, vectorised numpy, no protobuf or gRPC.

Each exposes a task object (`CLASSIFICATION`, `TAGGING`) that tells the data plane which views and
outputs it needs and turns them into results; evaluation code for a task sits beside it.
"""
