"""protos/atom/v1/atom.proto matches DESIGN.md field by field, and its committed code is fresh."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from auth_providers.proto.atom.v1 import atom_pb2, atom_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = Path("auth_providers") / "proto" / "atom" / "v1"
T = FieldDescriptor
S = T.TYPE_STRING

#: DESIGN.md, "Wire contracts of the providers", Atom: service -> method -> (request, response) fields.
CONTRACT: dict[str, dict[str, tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]]] = {
    "AuthService": {
        "AuthenticateCredential": (
            {"identifier": (1, S), "secret": (2, S), "kind": (3, S), "tenant_id": (4, S), "tenant_alias": (5, S)},
            {"entity_id": (1, S), "tenant_id": (2, S), "credential_id": (3, S)},
        ),
        "Authenticate": (
            {"token": (1, S)},
            {"entity_id": (1, S), "tenant_id": (2, S), "session_id": (3, S)},
        ),
    },
    "AuthzService": {
        "Check": (
            {
                "subject_id": (1, S), "action": (2, S), "resource_id": (3, S), "context": (4, T.TYPE_MESSAGE),
                "object_kind": (5, S), "object_id": (6, S),
            },
            {"allowed": (1, T.TYPE_BOOL), "reason": (2, S)},
        ),
    },
    "AliasService": {
        "ResolveAlias": (
            {"tenant_id": (1, S), "tenant_alias": (2, S), "object_kind": (3, S), "object_alias": (4, S),
             "global": (5, T.TYPE_BOOL)},
            {"tenant_id": (1, S), "object_id": (2, S)},
        ),
    },
    "CertificateService": {
        "ResolveCertificate": (
            {"serial_number": (1, S), "fingerprint_sha256": (2, S)},
            {"entity_id": (1, S), "tenant_id": (2, S), "credential_id": (3, S), "expires_at": (4, S)},
        ),
    },
}


def _fields(descriptor: object) -> dict[str, tuple[int, int]]:
    return {f.name: (f.number, f.type) for f in descriptor.fields}  # type: ignore[attr-defined]


def test_package_services_methods_and_fields_match_design() -> None:
    file = atom_pb2.DESCRIPTOR
    assert file.package == "atom.v1"
    assert set(file.services_by_name) == set(CONTRACT)
    for service_name, methods in CONTRACT.items():
        service = file.services_by_name[service_name]
        assert service.full_name == f"atom.v1.{service_name}"
        assert {m.name for m in service.methods} == set(methods)
        for method in service.methods:
            assert not method.client_streaming and not method.server_streaming
            request, response = methods[method.name]
            assert _fields(method.input_type) == request, method.name
            assert _fields(method.output_type) == response, method.name


def test_check_context_is_a_string_map() -> None:
    entry = atom_pb2.CheckRequest.DESCRIPTOR.fields_by_name["context"].message_type
    assert entry.GetOptions().map_entry
    assert [(f.name, f.type) for f in entry.fields] == [("key", S), ("value", S)]
    request = atom_pb2.CheckRequest(context={"protocol": "mqtt"})
    assert dict(atom_pb2.CheckRequest.FromString(request.SerializeToString()).context) == {"protocol": "mqtt"}


def test_a_keyword_field_still_round_trips() -> None:
    # `global` is a Python keyword: set and read it by name.
    request = atom_pb2.ResolveAliasRequest(object_alias="a", **{"global": True})
    assert getattr(atom_pb2.ResolveAliasRequest.FromString(request.SerializeToString()), "global") is True


def test_grpc_stubs_use_the_package_paths() -> None:
    assert atom_pb2_grpc.auth__providers_dot_proto_dot_atom_dot_v1_dot_atom__pb2 is atom_pb2
    for name in ("AuthServiceStub", "AuthzServiceStub", "AliasServiceStub", "CertificateServiceStub"):
        assert hasattr(atom_pb2_grpc, name)


def _descriptor_of(source: str) -> bytes:
    marker = "AddSerializedFile("
    start = source.index(marker) + len(marker)
    value = ast.literal_eval(source[start : source.index(")\n", start)])
    assert isinstance(value, bytes)
    return value


def test_committed_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is not installed")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    fresh = (tmp_path / GENERATED / "atom_pb2.py").read_text(encoding="utf-8")
    assert _descriptor_of(fresh) == atom_pb2.DESCRIPTOR.serialized_pb, "atom_pb2.py is stale: run scripts/gen_protos.sh"
    from importlib.metadata import version

    if atom_pb2_grpc.GRPC_GENERATED_VERSION == version("grpcio-tools"):
        for name in ("atom_pb2.py", "atom_pb2.pyi", "atom_pb2_grpc.py"):
            committed = (ROOT / GENERATED / name).read_bytes()
            assert (tmp_path / GENERATED / name).read_bytes() == committed, f"{name} is stale: run scripts/gen_protos.sh"
