"""A fake Atom for tests: a real `grpc.aio` server of `atom.v1` on loopback.

`AtomData` holds entities (with credentials, tokens and client
certificates), tenant and channel aliases and grants, and records every call: the method, the request message
and the metadata it came with. A call without the expected service token is
refused with UNAUTHENTICATED, as Atom would. `FakeAtom` serves it on
127.0.0.1 port 0 and can be stopped and started again on the same port (Atom
going away and coming back); run it on a `tests.callout_doubles.ServiceThread`
when the test drives blocking clients.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio

from auth_providers.proto.atom.v1 import atom_pb2, atom_pb2_grpc

M = TypeVar("M")


@dataclass(frozen=True)
class Entity:
    entity_id: str
    tenant_id: str


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate credential: whose it is and the `expires_at` the fake answers with."""

    fingerprint_sha256: str
    entity: Entity
    credential_id: str
    #: RFC 3339, answered as it is: the fake does not check it, so a test sees the gateway's own check.
    expires_at: str


@dataclass(frozen=True)
class Recorded:
    method: str
    request: Any
    metadata: dict[str, str]


@dataclass
class AtomData:
    """What the fake knows and everything it was asked."""

    service_token: str
    #: identifier -> (secret, entity): AuthenticateCredential with kind "password".
    credentials: dict[str, tuple[str, Entity]] = field(default_factory=dict)
    #: token -> entity: Authenticate.
    tokens: dict[str, Entity] = field(default_factory=dict)
    #: normalized serial number -> certificate: ResolveCertificate.
    certificates: dict[str, CertificateRecord] = field(default_factory=dict)
    #: tenant alias -> tenant id.
    tenant_aliases: dict[str, str] = field(default_factory=dict)
    #: (tenant id, channel alias) -> channel id.
    channel_aliases: dict[tuple[str, str], str] = field(default_factory=dict)
    #: (entity id, action, channel id) that Check allows.
    grants: set[tuple[str, str, str]] = field(default_factory=set)
    #: Answer every call with this status (an Atom that is failing).
    fail_with: grpc.StatusCode | None = None
    #: Seconds to wait before answering.
    delay: float = 0.0
    requests: list[Recorded] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)

    def add_device(self, identifier: str, secret: str, entity: Entity) -> None:
        self.credentials[identifier] = (secret, entity)

    def add_certificate(self, serial_number: str, fingerprint_sha256: str, entity: Entity, expires_at: str) -> None:
        self.certificates[normalize_serial(serial_number)] = CertificateRecord(
            fingerprint_sha256=fingerprint_sha256.lower(), entity=entity,
            credential_id=f"cert:{normalize_serial(serial_number)}", expires_at=expires_at,
        )

    def grant(self, entity: Entity, channel_id: str, *actions: str) -> None:
        for action in actions or ("publish", "subscribe"):
            self.grants.add((entity.entity_id, action, channel_id))

    def recorded(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    def reset(self) -> None:
        self.requests.clear()
        self.calls.clear()


def normalize_serial(serial_number: str) -> str:
    """Atom's `normalize_serial`: ":" and whitespace dropped, lowercase; "" when not whole hex bytes.

    No leading zero is dropped: "00a1" and "a1" are different serials to Atom.
    """
    text = "".join(ch for ch in serial_number if ch != ":" and not ch.isspace()).lower()
    try:
        bytes.fromhex(text)
    except ValueError:
        return ""
    return text if text and len(text) % 2 == 0 else ""


class _Base:
    def __init__(self, data: AtomData) -> None:
        self.data = data

    async def _serve(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, answer: Callable[[], Awaitable[M]]
    ) -> M:
        data = self.data
        metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        data.requests.append(Recorded(method, request, metadata))
        data.calls[method] += 1
        if data.delay:
            await asyncio.sleep(data.delay)
        if data.fail_with is not None:
            await context.abort(data.fail_with, "the fake Atom was told to fail")
        if metadata.get("authorization") != f"Bearer {data.service_token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong service token")
        return await answer()


class _AuthService(_Base, atom_pb2_grpc.AuthServiceServicer):
    async def Authenticate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            entity = self.data.tokens.get(request.token)
            if entity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
            return atom_pb2.AuthenticateResponse(entity_id=entity.entity_id, tenant_id=entity.tenant_id, session_id="s1")

        return await self._serve("Authenticate", request, context, answer)

    async def AuthenticateCredential(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            if request.kind != "password":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown credential kind {request.kind!r}")
            known = self.data.credentials.get(request.identifier)
            if known is None or known[0] != request.secret:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid credential")
            entity = known[1]
            return atom_pb2.AuthenticateCredentialResponse(
                entity_id=entity.entity_id, tenant_id=entity.tenant_id, credential_id=f"cred:{request.identifier}"
            )

        return await self._serve("AuthenticateCredential", request, context, answer)


class _AuthzService(_Base, atom_pb2_grpc.AuthzServiceServicer):
    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            if request.object_kind != "resource":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown object kind {request.object_kind!r}")
            allowed = (request.subject_id, request.action, request.object_id) in self.data.grants
            return atom_pb2.CheckResponse(allowed=allowed, reason="" if allowed else "no grant")

        return await self._serve("Check", request, context, answer)


class _AliasService(_Base, atom_pb2_grpc.AliasServiceServicer):
    async def ResolveAlias(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            data = self.data
            tenant_id = request.tenant_id or data.tenant_aliases.get(request.tenant_alias, "")
            if not tenant_id:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no tenant {request.tenant_alias!r}")
            channel_id = data.channel_aliases.get((tenant_id, request.object_alias))
            if channel_id is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.object_kind} {request.object_alias!r}")
            return atom_pb2.ResolveAliasResponse(tenant_id=tenant_id, object_id=channel_id)

        return await self._serve("ResolveAlias", request, context, answer)


class _CertificateService(_Base, atom_pb2_grpc.CertificateServiceServicer):
    async def ResolveCertificate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            serial = normalize_serial(request.serial_number)
            if not serial:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid certificate serial number")
            known = self.data.certificates.get(serial)
            fingerprint = request.fingerprint_sha256.replace(":", "").lower()
            # As Atom: an unknown serial and a fingerprint that is not the stored one are both NOT_FOUND.
            if known is None or (fingerprint and fingerprint != known.fingerprint_sha256):
                await context.abort(grpc.StatusCode.NOT_FOUND, "certificate not found")
                raise AssertionError("abort raises")
            return atom_pb2.ResolveCertificateResponse(
                entity_id=known.entity.entity_id, tenant_id=known.entity.tenant_id,
                credential_id=known.credential_id, expires_at=known.expires_at,
            )

        return await self._serve("ResolveCertificate", request, context, answer)


class FakeAtom:
    def __init__(self, data: AtomData, *, credentials: grpc.ServerCredentials | None = None) -> None:
        self.data = data
        self.credentials = credentials
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeAtom:
        server = grpc.aio.server()
        atom_pb2_grpc.add_AuthServiceServicer_to_server(_AuthService(self.data), server)
        atom_pb2_grpc.add_AuthzServiceServicer_to_server(_AuthzService(self.data), server)
        atom_pb2_grpc.add_AliasServiceServicer_to_server(_AliasService(self.data), server)
        atom_pb2_grpc.add_CertificateServiceServicer_to_server(_CertificateService(self.data), server)
        address = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self.credentials)
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)
