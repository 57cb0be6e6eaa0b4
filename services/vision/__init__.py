"""Vision serving platform: gRPC services for image classification, tagging, features and DELF."""

__version__ = "0.1.0"
