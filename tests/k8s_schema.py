"""Validate objects against a CRD's openAPIV3Schema, strictly: run in .venv-k8s (jsonschema>=4.23).

usage: python tests/k8s_schema.py SCHEMA.json OBJECTS.json   -> prints one error per line, exits 1 on any
"""

import json
import sys

import jsonschema


def unknown_fields(doc, schema, path="$"):
    """Fields the API server would prune as unknown (what `kubectl apply --validate=strict` rejects)."""
    if isinstance(doc, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if schema.get("x-kubernetes-preserve-unknown-fields") or (props is None and extra in (None, True)):
            return
        for key, value in doc.items():
            if props and key in props:
                yield from unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from unknown_fields(value, extra, f"{path}.{key}")
            else:
                yield f"{path}.{key}: unknown field"
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


def main() -> int:
    schema = json.load(open(sys.argv[1]))
    errors = []
    for doc in json.load(open(sys.argv[2])):
        name = doc.get("metadata", {}).get("name", "?")
        validator = jsonschema.Draft7Validator(schema)
        errors += [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        errors += [f"{name}: {e}" for e in unknown_fields(doc, schema)]
    print("\n".join(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
