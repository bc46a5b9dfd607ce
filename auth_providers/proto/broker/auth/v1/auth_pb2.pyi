from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    Unspecified: _ClassVar[Protocol]
    MQTT: _ClassVar[Protocol]
    AMQP_1_0: _ClassVar[Protocol]
    AMQP_0_9_1: _ClassVar[Protocol]
    HTTP: _ClassVar[Protocol]
    CoAP: _ClassVar[Protocol]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    # None: _ClassVar[Action]  -- a Python keyword: use the enum's Value("None")
    Publish: _ClassVar[Action]
    Subscribe: _ClassVar[Action]

class HookType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HookTypeUnspecified: _ClassVar[HookType]
    AuthOnRegister: _ClassVar[HookType]
    AuthOnPublish: _ClassVar[HookType]
    AuthOnSubscribe: _ClassVar[HookType]
    AuthOnUnsubscribe: _ClassVar[HookType]

class HookResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HookResultUnspecified: _ClassVar[HookResult]
    HookResultOk: _ClassVar[HookResult]
    HookResultDeny: _ClassVar[HookResult]
Unspecified: Protocol
MQTT: Protocol
AMQP_1_0: Protocol
AMQP_0_9_1: Protocol
HTTP: Protocol
CoAP: Protocol
# None: Action  -- a Python keyword: use the enum's Value("None")
Publish: Action
Subscribe: Action
HookTypeUnspecified: HookType
AuthOnRegister: HookType
AuthOnPublish: HookType
AuthOnSubscribe: HookType
AuthOnUnsubscribe: HookType
HookResultUnspecified: HookResult
HookResultOk: HookResult
HookResultDeny: HookResult

class AuthnReq(_message.Message):
    __slots__ = ("client_id", "username", "password", "protocol")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    username: str
    password: str
    protocol: Protocol
    def __init__(self, client_id: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., protocol: _Optional[_Union[Protocol, str]] = ...) -> None: ...

class AuthnRes(_message.Message):
    __slots__ = ("authenticated", "id", "reason_code", "reason")
    AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    authenticated: bool
    id: str
    reason_code: int
    reason: str
    def __init__(self, authenticated: _Optional[bool] = ..., id: _Optional[str] = ..., reason_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AuthzReq(_message.Message):
    __slots__ = ("external_id", "topic", "action")
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    external_id: str
    topic: str
    action: Action
    def __init__(self, external_id: _Optional[str] = ..., topic: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ...) -> None: ...

class AuthzRes(_message.Message):
    __slots__ = ("authorized", "reason_code", "reason")
    AUTHORIZED_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    authorized: bool
    reason_code: int
    reason: str
    def __init__(self, authorized: _Optional[bool] = ..., reason_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class HookReq(_message.Message):
    __slots__ = ("hook", "client_id", "external_id", "protocol", "topic", "payload", "qos", "retain", "properties", "username", "password")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOOK_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    hook: HookType
    client_id: str
    external_id: str
    protocol: Protocol
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: _containers.ScalarMap[str, str]
    username: str
    password: str
    def __init__(self, hook: _Optional[_Union[HookType, str]] = ..., client_id: _Optional[str] = ..., external_id: _Optional[str] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., topic: _Optional[str] = ..., payload: _Optional[bytes] = ..., qos: _Optional[int] = ..., retain: _Optional[bool] = ..., properties: _Optional[_Mapping[str, str]] = ..., username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class HookRes(_message.Message):
    __slots__ = ("result", "topic", "payload", "payload_set", "qos", "qos_set", "retain", "retain_set", "properties", "reason_code", "reason", "external_id")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SET_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    QOS_SET_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    RETAIN_SET_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    result: HookResult
    topic: str
    payload: bytes
    payload_set: bool
    qos: int
    qos_set: bool
    retain: bool
    retain_set: bool
    properties: _containers.ScalarMap[str, str]
    reason_code: int
    reason: str
    external_id: str
    def __init__(self, result: _Optional[_Union[HookResult, str]] = ..., topic: _Optional[str] = ..., payload: _Optional[bytes] = ..., payload_set: _Optional[bool] = ..., qos: _Optional[int] = ..., qos_set: _Optional[bool] = ..., retain: _Optional[bool] = ..., retain_set: _Optional[bool] = ..., properties: _Optional[_Mapping[str, str]] = ..., reason_code: _Optional[int] = ..., reason: _Optional[str] = ..., external_id: _Optional[str] = ...) -> None: ...
