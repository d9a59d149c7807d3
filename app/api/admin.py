"""``/admin``: virtual keys and LoRA adapters (admin credential only; the middleware enforces that). No logic here."""

from __future__ import annotations

from litestar import Controller, Request, delete, get, patch, post

from app.protocol.admin import AdapterList, AdapterView, CreatedKey, KeyCreate, KeyList, KeyUpdate, KeyView
from app.services.adapters import AdapterRegistry
from app.services.keys import KeyService

MAX_ADAPTER_BYTES = 2 << 30
"""Largest adapter file an admin may upload (LoRAs of large models are hundreds of MB)."""


class AdminController(Controller):
    path = "/admin/keys"

    @post("/", status_code=201, operation_id="createKey")
    async def create_key(self, data: KeyCreate, keys: KeyService) -> CreatedKey:
        return await keys.create(data)

    @get("/", operation_id="listKeys")
    async def list_keys(self, keys: KeyService) -> KeyList:
        return await keys.list()

    @get("/{key_id:str}", operation_id="showKey")
    async def show_key(self, key_id: str, keys: KeyService) -> KeyView:
        return await keys.show(key_id)

    @patch("/{key_id:str}", operation_id="updateKey")
    async def update_key(self, key_id: str, data: KeyUpdate, keys: KeyService) -> KeyView:
        return await keys.update(key_id, data)

    @post("/{key_id:str}/revoke", status_code=200, operation_id="revokeKey")
    async def revoke_key(self, key_id: str, keys: KeyService) -> KeyView:
        return await keys.revoke(key_id)

    @delete("/{key_id:str}", status_code=204, operation_id="deleteKey")
    async def delete_key(self, key_id: str, keys: KeyService) -> None:
        await keys.delete(key_id)


class AdaptersController(Controller):
    """LoRA adapters: uploaded and managed by an admin (``/admin/adapters``), listed for each key (``/v1/adapters``)."""

    @post("/admin/adapters", status_code=201, operation_id="uploadAdapter", request_max_body_size=MAX_ADAPTER_BYTES)
    async def upload(
        self,
        request: Request,
        adapters: AdapterRegistry,
        model: str,
        name: str | None = None,
        trigger_word: str | None = None,
        owner: str | None = None,
    ) -> AdapterView:
        return await adapters.upload(
            request.stream(),
            model=model,
            name=name,
            trigger_word=trigger_word,
            owner=owner,
            limit=MAX_ADAPTER_BYTES,
        )

    @get("/admin/adapters", operation_id="listAdapters")
    async def list_all(self, request: Request, adapters: AdapterRegistry, model: str | None = None) -> AdapterList:
        return await adapters.visible(request.user, model)

    @get("/admin/adapters/{adapter_id:str}", operation_id="showAdapter")
    async def show(self, adapter_id: str, adapters: AdapterRegistry) -> AdapterView:
        return await adapters.show(adapter_id)

    @delete("/admin/adapters/{adapter_id:str}", status_code=204, operation_id="deleteAdapter")
    async def delete(self, adapter_id: str, adapters: AdapterRegistry) -> None:
        await adapters.delete(adapter_id)

    @get("/v1/adapters", operation_id="listOwnAdapters")
    async def list_own(self, request: Request, adapters: AdapterRegistry, model: str | None = None) -> AdapterList:
        return await adapters.visible(request.user, model)
