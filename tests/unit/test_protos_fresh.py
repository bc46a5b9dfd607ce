"""The committed generated code matches protos/, and the callout protos match DESIGN.md."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth_providers.proto.broker.auth.v1 import auth_pb2 as broker_pb2
from auth_providers.proto.broker.auth.v1 import auth_pb2_grpc as broker_grpc
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2 as fluxmq_pb2
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2_grpc as fluxmq_grpc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = Path("auth_providers") / "proto"
PACKAGES = {"broker.auth.v1": broker_pb2, "fluxmq.auth.v1": fluxmq_pb2}

T = FieldDescriptor
# DESIGN.md, "Wire contracts of the providers": name -> (number, type, enum or message type).
MESSAGES: dict[str, dict[str, tuple[int, int, str]]] = {
    "AuthnReq": {
        "client_id": (1, T.TYPE_STRING, ""),
        "username": (2, T.TYPE_STRING, ""),
        "password": (3, T.TYPE_STRING, ""),
        "protocol": (4, T.TYPE_ENUM, "Protocol"),
    },
    "AuthnRes": {
        "authenticated": (1, T.TYPE_BOOL, ""),
        "id": (2, T.TYPE_STRING, ""),
        "reason_code": (3, T.TYPE_UINT32, ""),
        "reason": (4, T.TYPE_STRING, ""),
    },
    "AuthzReq": {
        "external_id": (1, T.TYPE_STRING, ""),
        "topic": (2, T.TYPE_STRING, ""),
        "action": (3, T.TYPE_ENUM, "Action"),
    },
    "AuthzRes": {
        "authorized": (1, T.TYPE_BOOL, ""),
        "reason_code": (2, T.TYPE_UINT32, ""),
        "reason": (3, T.TYPE_STRING, ""),
    },
    "HookReq": {
        "hook": (1, T.TYPE_ENUM, "HookType"),
        "client_id": (2, T.TYPE_STRING, ""),
        "external_id": (3, T.TYPE_STRING, ""),
        "protocol": (4, T.TYPE_ENUM, "Protocol"),
        "topic": (5, T.TYPE_STRING, ""),
        "payload": (6, T.TYPE_BYTES, ""),
        "qos": (7, T.TYPE_UINT32, ""),
        "retain": (8, T.TYPE_BOOL, ""),
        "properties": (9, T.TYPE_MESSAGE, "HookReq.PropertiesEntry"),
        "username": (10, T.TYPE_STRING, ""),
        "password": (11, T.TYPE_STRING, ""),
    },
    "HookRes": {
        "result": (1, T.TYPE_ENUM, "HookResult"),
        "topic": (2, T.TYPE_STRING, ""),
        "payload": (3, T.TYPE_BYTES, ""),
        "payload_set": (4, T.TYPE_BOOL, ""),
        "qos": (5, T.TYPE_UINT32, ""),
        "qos_set": (6, T.TYPE_BOOL, ""),
        "retain": (7, T.TYPE_BOOL, ""),
        "retain_set": (8, T.TYPE_BOOL, ""),
        "properties": (9, T.TYPE_MESSAGE, "HookRes.PropertiesEntry"),
        "reason_code": (10, T.TYPE_UINT32, ""),
        "reason": (11, T.TYPE_STRING, ""),
        "external_id": (12, T.TYPE_STRING, ""),
    },
}
ENUMS: dict[str, dict[str, int]] = {
    "Protocol": {"Unspecified": 0, "MQTT": 1, "AMQP_1_0": 2, "AMQP_0_9_1": 3, "HTTP": 4, "CoAP": 5},
    "Action": {"None": 0, "Publish": 1, "Subscribe": 2},
    "HookType": {
        "HookTypeUnspecified": 0,
        "AuthOnRegister": 1,
        "AuthOnPublish": 2,
        "AuthOnSubscribe": 3,
        "AuthOnUnsubscribe": 4,
    },
    "HookResult": {"HookResultUnspecified": 0, "HookResultOk": 1, "HookResultDeny": 2},
}
SERVICES: dict[str, dict[str, tuple[str, str]]] = {
    "AuthService": {"Authenticate": ("AuthnReq", "AuthnRes"), "Authorize": ("AuthzReq", "AuthzRes")},
    "HookService": {"Handle": ("HookReq", "HookRes")},
}


def _grpc_tools_version() -> str:
    grpc_tools = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is not installed")
    del grpc_tools
    from importlib.metadata import version

    return version("grpcio-tools")


def _tree(base: Path) -> dict[str, bytes]:
    root = base / GENERATED
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def _regenerate(out: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"scripts/gen_protos.sh failed:\n{result.stderr}"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _grpc_tools_version()
    out = tmp_path_factory.mktemp("gen")
    _regenerate(out)
    return out


def test_every_proto_has_committed_code() -> None:
    protos = sorted(p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*.proto"))
    assert protos, "no .proto files under protos/"
    for proto in protos:
        stem = ROOT / GENERATED / proto.parent / proto.stem
        for suffix in ("_pb2.py", "_pb2.pyi"):
            assert Path(f"{stem}{suffix}").is_file(), f"{proto}: run scripts/gen_protos.sh"


def test_descriptors_match_the_protos(regenerated: Path) -> None:
    """Whatever the grpcio-tools version: the committed modules describe the current .proto files."""
    for name, module in PACKAGES.items():
        fresh = _descriptor_of(regenerated / GENERATED / Path(*name.split(".")) / "auth_pb2.py")
        assert fresh == module.DESCRIPTOR.serialized_pb, f"{module.__name__} is stale: run scripts/gen_protos.sh"


def _descriptor_of(path: Path) -> bytes:
    # The module registers itself in the default pool on import, which already
    # holds the committed one; read the serialized descriptor from the source instead.
    source = path.read_text(encoding="utf-8")
    marker = "AddSerializedFile("
    start = source.index(marker) + len(marker)
    end = source.index(")\n", start)
    literal = source[start:end]
    value = ast.literal_eval(literal)
    assert isinstance(value, bytes)
    return value


def test_committed_code_is_what_the_script_generates(regenerated: Path) -> None:
    tools = _grpc_tools_version()
    if broker_grpc.GRPC_GENERATED_VERSION != tools:
        pytest.skip(
            f"committed code was generated by grpcio-tools {broker_grpc.GRPC_GENERATED_VERSION}, "
            f"installed is {tools}: only the descriptors can be compared"
        )
    committed, fresh = _tree(ROOT), _tree(regenerated)
    assert sorted(committed) == sorted(fresh), "generated files differ: run scripts/gen_protos.sh"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"stale generated files {stale}: run scripts/gen_protos.sh"


def test_generated_stubs_parse_as_python() -> None:
    for path in (ROOT / GENERATED).rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_messages_match_design(package: str) -> None:
    module = PACKAGES[package]
    file = module.DESCRIPTOR
    assert file.package == package
    assert set(file.message_types_by_name) == set(MESSAGES)
    for message_name, expected in MESSAGES.items():
        descriptor: Descriptor = file.message_types_by_name[message_name]
        actual = {}
        for field in descriptor.fields:
            type_name = ""
            if field.enum_type is not None:
                type_name = field.enum_type.full_name
            elif field.message_type is not None:
                type_name = field.message_type.full_name
            actual[field.name] = (field.number, field.type, type_name)
        wanted = {
            name: (number, kind, f"{package}.{type_name}" if type_name else "")
            for name, (number, kind, type_name) in expected.items()
        }
        assert actual == wanted, message_name
    for message_name in ("HookReq", "HookRes"):
        entry = file.message_types_by_name[message_name].fields_by_name["properties"].message_type
        assert entry.GetOptions().map_entry
        assert [(f.name, f.type) for f in entry.fields] == [("key", T.TYPE_STRING), ("value", T.TYPE_STRING)]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_enums_and_services_match_design(package: str) -> None:
    module = PACKAGES[package]
    file = module.DESCRIPTOR
    assert set(file.enum_types_by_name) == set(ENUMS)
    for enum_name, values in ENUMS.items():
        enum = file.enum_types_by_name[enum_name]
        assert {value.name: value.number for value in enum.values} == values, enum_name
    # A keyword as an enum value name still works through the wrapper.
    assert module.Action.Value("None") == 0
    assert module.Action.Name(0) == "None"
    assert set(file.services_by_name) == set(SERVICES)
    for service_name, methods in SERVICES.items():
        service = file.services_by_name[service_name]
        assert service.full_name == f"{package}.{service_name}"
        actual = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
        assert actual == methods
        for method in service.methods:
            assert not method.client_streaming and not method.server_streaming


def test_grpc_modules_import_their_own_package() -> None:
    assert broker_grpc.auth__providers_dot_proto_dot_broker_dot_auth_dot_v1_dot_auth__pb2 is broker_pb2
    assert fluxmq_grpc.auth__providers_dot_proto_dot_fluxmq_dot_auth_dot_v1_dot_auth__pb2 is fluxmq_pb2
    assert broker_pb2.AuthnReq.DESCRIPTOR.full_name == "broker.auth.v1.AuthnReq"
    assert fluxmq_pb2.AuthnReq.DESCRIPTOR.full_name == "fluxmq.auth.v1.AuthnReq"


def test_the_two_files_define_the_same_contract() -> None:
    def normalised(module: ModuleType, package: str) -> str:
        proto = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        text = str(proto).replace(package, "PKG").replace(package.replace(".", "/"), "PKG")
        return text

    assert normalised(broker_pb2, "broker.auth.v1") == normalised(fluxmq_pb2, "fluxmq.auth.v1")


def _values_for(descriptor: Descriptor, draw: st.DrawFn) -> dict[str, object]:
    values: dict[str, object] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values[field.name] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
        elif field.enum_type is not None:
            # Unknown enum numbers must survive too (open enums in proto3).
            values[field.name] = draw(st.integers(min_value=0, max_value=9))
        elif field.type == T.TYPE_STRING:
            values[field.name] = draw(st.text(max_size=20))
        elif field.type == T.TYPE_BYTES:
            values[field.name] = draw(st.binary(max_size=20))
        elif field.type == T.TYPE_BOOL:
            values[field.name] = draw(st.booleans())
        elif field.type == T.TYPE_UINT32:
            values[field.name] = draw(st.integers(min_value=0, max_value=2**32 - 1))
        else:
            raise AssertionError(f"{descriptor.name}.{field.name}: add a strategy for type {field.type}")
    return values


@st.composite
def _message(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    name = draw(st.sampled_from(sorted(MESSAGES)))
    return name, _values_for(broker_pb2.DESCRIPTOR.message_types_by_name[name], draw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=_message(), broker_first=st.booleans())
def test_messages_are_wire_identical(sample: tuple[str, dict[str, object]], broker_first: bool) -> None:
    name, values = sample
    source, target = (broker_pb2, fluxmq_pb2) if broker_first else (fluxmq_pb2, broker_pb2)
    sent = getattr(source, name)(**values)
    received = getattr(target, name).FromString(sent.SerializeToString(deterministic=True))
    for field, value in values.items():
        got = getattr(received, field)
        assert (dict(got) if isinstance(value, dict) else got) == value, f"{name}.{field}"
    assert received.SerializeToString(deterministic=True) == sent.SerializeToString(deterministic=True)
