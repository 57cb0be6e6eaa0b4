"""gRPC servicers: protobuf ⇄ domain types around the data plane. No business logic here."""
