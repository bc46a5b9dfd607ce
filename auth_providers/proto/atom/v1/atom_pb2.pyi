from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AuthenticateCredentialRequest(_message.Message):
    __slots__ = ("identifier", "secret", "kind", "tenant_id", "tenant_alias")
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ALIAS_FIELD_NUMBER: _ClassVar[int]
    identifier: str
    secret: str
    kind: str
    tenant_id: str
    tenant_alias: str
    def __init__(self, identifier: _Optional[str] = ..., secret: _Optional[str] = ..., kind: _Optional[str] = ..., tenant_id: _Optional[str] = ..., tenant_alias: _Optional[str] = ...) -> None: ...

class AuthenticateCredentialResponse(_message.Message):
    __slots__ = ("entity_id", "tenant_id", "credential_id")
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    tenant_id: str
    credential_id: str
    def __init__(self, entity_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., credential_id: _Optional[str] = ...) -> None: ...

class AuthenticateRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("entity_id", "tenant_id", "session_id")
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    tenant_id: str
    session_id: str
    def __init__(self, entity_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("subject_id", "action", "resource_id", "context", "object_kind", "object_id")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    action: str
    resource_id: str
    context: _containers.ScalarMap[str, str]
    object_kind: str
    object_id: str
    def __init__(self, subject_id: _Optional[str] = ..., action: _Optional[str] = ..., resource_id: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., object_kind: _Optional[str] = ..., object_id: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("allowed", "reason")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ResolveAliasRequest(_message.Message):
    __slots__ = ("tenant_id", "tenant_alias", "object_kind", "object_alias")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ALIAS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ALIAS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tenant_alias: str
    object_kind: str
    object_alias: str
    def __init__(self, tenant_id: _Optional[str] = ..., tenant_alias: _Optional[str] = ..., object_kind: _Optional[str] = ..., object_alias: _Optional[str] = ..., **kwargs) -> None: ...

class ResolveAliasResponse(_message.Message):
    __slots__ = ("tenant_id", "object_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    object_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., object_id: _Optional[str] = ...) -> None: ...

class ResolveCertificateRequest(_message.Message):
    __slots__ = ("serial_number", "fingerprint_sha256")
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    serial_number: str
    fingerprint_sha256: str
    def __init__(self, serial_number: _Optional[str] = ..., fingerprint_sha256: _Optional[str] = ...) -> None: ...

class ResolveCertificateResponse(_message.Message):
    __slots__ = ("entity_id", "tenant_id", "credential_id", "expires_at")
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    tenant_id: str
    credential_id: str
    expires_at: str
    def __init__(self, entity_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., credential_id: _Optional[str] = ..., expires_at: _Optional[str] = ...) -> None: ...
