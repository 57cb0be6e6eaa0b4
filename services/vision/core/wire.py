"""The gRPC API's message-size limit, defined once for the server, the tasks that size their answers, and
every client (this module imports nothing, so a client pays nothing for it)."""

# The most a server sends in one answer, and the default of `--max-request-bytes` (what it accepts). A DELF
# answer of 1000 keypoints with 1024-d descriptors is 4 MiB per image, so the API's answers outgrow gRPC's
# 4 MiB default after one image.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
