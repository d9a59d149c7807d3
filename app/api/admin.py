"""``/admin``: virtual keys (admin credential only; the middleware enforces that). No logic lives here."""

from __future__ import annotations

from litestar import Controller, delete, get, patch, post

from app.protocol.admin import CreatedKey, KeyCreate, KeyList, KeyUpdate, KeyView
from app.services.keys import KeyService


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
