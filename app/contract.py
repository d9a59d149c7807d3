"""The API contract: ``openapi.yaml`` and its ``schemas/`` components, bundled into one document to serve."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

_PACKAGED = Path(__file__).parent / "contract"
_SOURCE = Path(__file__).parent.parent


def contract_root() -> Path:
    """Where ``openapi.yaml`` lives: the source tree, or the copy packaged into the wheel."""
    for root in (_SOURCE, _PACKAGED):
        if (root / "openapi.yaml").is_file() and (root / "schemas").is_dir():
            return root
    raise FileNotFoundError("openapi.yaml not found")


def bundle(root: Path | None = None) -> dict[str, Any]:
    """Load ``openapi.yaml`` and inline every external ``$ref`` into ``components.schemas``."""
    root = root or contract_root()
    doc = yaml.safe_load((root / "openapi.yaml").read_text())
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    cache: dict[Path, dict[str, Any]] = {}

    def load(path: Path) -> dict[str, Any]:
        if path not in cache:
            cache[path] = yaml.safe_load(path.read_text()) or {}
        return cache[path]

    def walk(node: Any, base: Path) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#/components/"):
                file_part, _, pointer = ref.partition("#")
                target = (base.parent / file_part).resolve() if file_part else base
                name = pointer.strip("/").split("/")[-1]
                if name not in schemas:
                    schemas[name] = {}  # placeholder first: schemas may refer to themselves
                    schemas[name] = walk(load(target)[name], target)
                return {**{k: v for k, v in node.items() if k != "$ref"}, "$ref": f"#/components/schemas/{name}"}
            return {k: walk(v, base) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, base) for v in node]
        return node

    bundled = walk({k: v for k, v in doc.items() if k != "components"}, root / "openapi.yaml")
    components = walk({k: v for k, v in doc["components"].items() if k != "schemas"}, root / "openapi.yaml")
    local = {k: walk(v, root / "openapi.yaml") for k, v in list(doc["components"]["schemas"].items()) if v}
    schemas.update(local)
    bundled["components"] = {**components, "schemas": dict(sorted(schemas.items()))}
    return bundled


@functools.cache
def bundled_yaml() -> bytes:
    return yaml.safe_dump(bundle(), sort_keys=False, allow_unicode=True).encode()
