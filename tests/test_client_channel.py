"""vision.client.channel: every client opens its channels through `open_channel`, whose limits are the
server's, so an answer the server may send (up to 64 MiB) reaches every client, past gRPC's 4 MiB default."""

from __future__ import annotations

import ast

import grpc
import pytest
from conftest import ROOT, encode, photo
from vision.client import channel as client_channel
from vision.client.channel import open_channel
from vision.config.settings import ServeSettings
from vision.runners.server import _grpc_options
from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024
# Each answer carries 1000 keypoints with 112-d descriptors per image (~470 kB), even at 256 px: ten pass 4 MiB.
IMAGES = 10


def test_a_client_receives_what_a_server_sends_and_leaves_request_sizes_to_the_server():
    server = dict(_grpc_options(ServeSettings(max_request_bytes=256 * 1024 * 1024)))
    limits = dict(client_channel.OPTIONS)
    assert limits["grpc.max_receive_message_length"] == server["grpc.max_send_message_length"]
    # A server that accepts more than the default must get it: the client sets no cap of its own.
    assert limits["grpc.max_send_message_length"] == -1


def test_every_client_opens_its_channels_through_the_factory():
    """No other module of the clients (vision.client, the CLI, the load generators) opens a channel of its own."""
    sources = [
        *(ROOT / "services" / "vision" / "client").glob("*.py"),
        ROOT / "services" / "vision" / "cli.py",
        *(ROOT / "loadtest").glob("*.py"),
    ]
    opened = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("insecure_channel", "secure_channel"):
                opened.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert opened and all(entry.startswith("services/vision/client/channel.py:") for entry in opened), opened


@pytest.fixture(scope="module")
def big_extract() -> delf_pb2.DelfExtractRequest:
    image = encode(photo("motorcycle_left.png"), "JPEG", quality=92)
    return delf_pb2.DelfExtractRequest(
        images=[common_pb2.Image(id=f"img{i}", content=image) for i in range(IMAGES)],
        options=delf_pb2.DelfExtractOptions(max_image_side=256),
    )


def test_the_answer_is_more_than_grpcs_default_channel_accepts(server, big_extract):
    with grpc.insecure_channel(server.address) as plain, pytest.raises(grpc.RpcError) as info:
        delf_pb2_grpc.DelfStub(plain).Extract(big_extract, timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_factory_channel_receives_an_answer_past_4_mib(server, big_extract):
    with open_channel(server.address) as channel:
        response = delf_pb2_grpc.DelfStub(channel).Extract(big_extract, timeout=120)
    assert response.ByteSize() > GRPC_DEFAULT_RECEIVE
    assert [len(r.features.keypoints) for r in response.results] == [1000] * IMAGES


async def test_an_asyncio_factory_channel_receives_it_too(server, big_extract):
    async with open_channel(server.address, aio=True) as channel:
        response = await delf_pb2_grpc.DelfStub(channel).Extract(big_extract, timeout=120)
    assert response.ByteSize() > GRPC_DEFAULT_RECEIVE
