"""Seldon's v1 gRPC messages for clients, without seldon-core: the pipeline environment and the tests talk to a
Seldon server but cannot install seldon-core 1.19 (Python >= 3.12) beside torch.

Built at import from the field numbers of seldon-core's ``prediction.proto`` (wire-compatible; ``customData`` and
``tftensor`` left out, which imgsim never sends) in a private descriptor pool, so it never collides with
seldon-core's own generated module where both are imported."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

PACKAGE = "seldon.protos"
_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {"string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
          "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT}

# message -> [(field, number, type, repeated, oneof)]; a type that is not a scalar names a message.
_MESSAGES = {
    "SeldonMessage": [("status", 1, "Status", False, None), ("meta", 2, "Meta", False, None),
                      ("data", 3, "DefaultData", False, 0), ("binData", 4, "bytes", False, 0),
                      ("strData", 5, "string", False, 0), ("jsonData", 6, ".google.protobuf.Value", False, 0)],
    "DefaultData": [("names", 1, "string", True, None), ("tensor", 2, "Tensor", False, 0),
                    ("ndarray", 3, ".google.protobuf.ListValue", False, 0)],
    "Tensor": [("shape", 1, "int32", True, None), ("values", 2, "double", True, None)],
    "Meta": [("puid", 1, "string", False, None), ("tags", 2, "Meta.TagsEntry", True, None),
             ("routing", 3, "Meta.RoutingEntry", True, None), ("requestPath", 4, "Meta.RequestPathEntry", True, None),
             ("metrics", 5, "Metric", True, None)],
    "Metric": [("key", 1, "string", False, None), ("type", 2, "enum Metric.MetricType", False, None),
               ("value", 3, "float", False, None), ("tags", 4, "Metric.TagsEntry", True, None)],
    "SeldonMessageList": [("seldonMessages", 1, "SeldonMessage", True, None)],
    "Status": [("code", 1, "int32", False, None), ("info", 2, "string", False, None),
               ("reason", 3, "string", False, None), ("status", 4, "enum Status.StatusFlag", False, None)],
    "Feedback": [("request", 1, "SeldonMessage", False, None), ("response", 2, "SeldonMessage", False, None),
                 ("reward", 3, "float", False, None), ("truth", 4, "SeldonMessage", False, None)],
    "SeldonMessageMetadata": [("messagetype", 1, "string", False, None),
                              ("schema", 2, ".google.protobuf.Value", False, None), ("name", 3, "string", False, None),
                              ("datatype", 4, "string", False, None), ("shape", 5, "int64", True, None)],
    "SeldonModelMetadata": [("name", 1, "string", False, None), ("versions", 2, "string", True, None),
                            ("platform", 3, "string", False, None),
                            ("inputs", 4, "SeldonMessageMetadata", True, None),
                            ("outputs", 5, "SeldonMessageMetadata", True, None),
                            ("custom", 6, "SeldonModelMetadata.CustomEntry", True, None)],
}
# map<K, V> fields: protobuf spells them as nested *Entry messages.
_MAPS = {("Meta", "TagsEntry"): ".google.protobuf.Value", ("Meta", "RoutingEntry"): "int32",
         ("Meta", "RequestPathEntry"): "string", ("Metric", "TagsEntry"): "string",
         ("SeldonModelMetadata", "CustomEntry"): "string"}
_ENUMS = {("Metric", "MetricType"): ("COUNTER", "GAUGE", "TIMER"), ("Status", "StatusFlag"): ("SUCCESS", "FAILURE")}


def _field(name: str, number: int, kind: str, repeated: bool, oneof: int | None) -> _F:
    field = _F(name=name, number=number, json_name=name,
               label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if kind in _TYPES:
        field.type = _TYPES[kind]
    elif kind.startswith("enum "):
        field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{kind.removeprefix('enum ')}"
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = kind if kind.startswith(".") else f".{PACKAGE}.{kind}"
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="imgsim/seldon_prediction.proto", package=PACKAGE,
                                               syntax="proto3", dependency=["google/protobuf/struct.proto"])
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        message.field.extend(_field(*f) for f in fields)
        if any(f[4] is not None for f in fields):
            message.oneof_decl.add(name="data_oneof")
        for (owner, entry), value in _MAPS.items():
            if owner == name:
                nested = message.nested_type.add(name=entry, options=descriptor_pb2.MessageOptions(map_entry=True))
                nested.field.extend([_field("key", 1, "string", False, None), _field("value", 2, value, False, None)])
        for (owner, enum), values in _ENUMS.items():
            if owner == name:
                message.enum_type.add(name=enum).value.extend(
                    descriptor_pb2.EnumValueDescriptorProto(name=v, number=i) for i, v in enumerate(values))
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
_POOL.Add(_file())


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


SeldonMessage = _message("SeldonMessage")
SeldonMessageList = _message("SeldonMessageList")
Feedback = _message("Feedback")
SeldonModelMetadata = _message("SeldonModelMetadata")


def _serialize(message) -> bytes:
    return message.SerializeToString()  # any message: Metadata's Empty is sent as an empty SeldonMessage too


class _Stub:
    """A service's unary methods: ``stub.Predict(message, timeout=...)``, as grpc's generated stubs offer them."""

    _methods: dict[str, tuple[type | None, type]] = {}
    _service = ""

    def __init__(self, channel: grpc.Channel) -> None:
        for method, (_, reply) in self._methods.items():
            setattr(self, method, channel.unary_unary(
                f"/{PACKAGE}.{self._service}/{method}", request_serializer=_serialize,
                response_deserializer=reply.FromString))


class ModelStub(_Stub):
    _service = "Model"
    _methods = {"Predict": (SeldonMessage, SeldonMessage), "SendFeedback": (Feedback, SeldonMessage),
                "Metadata": (None, SeldonModelMetadata)}


class TransformerStub(_Stub):
    _service = "Transformer"
    _methods = {"TransformInput": (SeldonMessage, SeldonMessage)}


class CombinerStub(_Stub):
    _service = "Combiner"
    _methods = {"Aggregate": (SeldonMessageList, SeldonMessage)}
