"""TLS, mutual TLS and bearer tokens on the shared server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from til.v1 import cacher_pb2, cacher_pb2_grpc

from services.common.auth import caller_identity
from services.common.channels import ClientTls, open_channel
from services.common.server import Service, start_server
from services.common.settings import ServerSettings
from tests.conftest import in_process_server

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to make test certs"
)

TOKEN = "t0ken-for-team-a-0123456789"


class EchoIdentity(cacher_pb2_grpc.CacherServiceServicer):
    async def GetEntry(self, request, context):
        return cacher_pb2.GetEntryResponse(found=True, value_json=f'"{caller_identity.get()}"')


SERVICE = Service(
    "til.v1.CacherService", lambda s: cacher_pb2_grpc.add_CacherServiceServicer_to_server(EchoIdentity(), s)
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server cert for localhost, and a client cert, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


async def _get(channel: grpc.aio.Channel, **kwargs) -> str:
    reply = await cacher_pb2_grpc.CacherServiceStub(channel).GetEntry(
        cacher_pb2.GetEntryRequest(), timeout=5, **kwargs
    )
    return reply.value_json.strip('"')


async def test_tls_serves_tls_clients(pki: Path) -> None:
    settings = ServerSettings(tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"))
    running = await start_server(settings, [SERVICE])
    try:
        channel = open_channel(f"localhost:{running.port}", tls=ClientTls(ca_file=str(pki / "ca.pem")))
        assert await _get(channel) == "127.0.0.1"
        await channel.close()
        plaintext = grpc.aio.insecure_channel(f"localhost:{running.port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _get(plaintext)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        await plaintext.close()
    finally:
        await running.stop(0)


async def test_mutual_tls_refuses_a_client_without_a_cert(pki: Path) -> None:
    settings = ServerSettings(
        tls_cert_file=str(pki / "server.pem"),
        tls_key_file=str(pki / "server.key"),
        tls_client_ca_file=str(pki / "ca.pem"),
    )
    running = await start_server(settings, [SERVICE])
    try:
        without = open_channel(f"localhost:{running.port}", tls=ClientTls(ca_file=str(pki / "ca.pem")))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _get(without)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        await without.close()
        with_cert = open_channel(
            f"localhost:{running.port}",
            tls=ClientTls(
                ca_file=str(pki / "ca.pem"),
                cert_file=str(pki / "client.pem"),
                key_file=str(pki / "client.key"),
            ),
        )
        assert await _get(with_cert) == "127.0.0.1"
        await with_cert.close()
    finally:
        await running.stop(0)


async def test_bearer_tokens_identify_callers_and_leave_health_open() -> None:
    settings = ServerSettings(auth_tokens=f"team-a:{TOKEN}")
    async with in_process_server([SERVICE], settings) as (_, channel):
        assert await _get(channel, metadata=(("authorization", f"Bearer {TOKEN}"),)) == "team-a"
        for metadata, hint in [
            ((), "missing"),
            ((("authorization", "Bearer wrong-token-000000000"),), "not valid"),
            ((("authorization", TOKEN),), "Bearer"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _get(channel, metadata=metadata)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert hint in info.value.details()
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_settings_must_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="tls_key_file"):
        ServerSettings(tls_cert_file="/x.pem")
    with pytest.raises(ValueError, match="tokens of 16"):
        ServerSettings(auth_tokens="team:short").token_identities()
