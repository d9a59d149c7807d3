"""The ModelsLab dialect (seed 004), answered by :class:`ModelsLabService`. No logic here.

Every route is a ``POST`` with the key in the JSON body, under the paths its clients use: ``/api/v6/images/…``
(community), ``/api/v1/enterprise/…`` and the official SDK's ``/api/v1/enterprise/images/…``, and the older
informational ones.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post

from app.api.images import base_url
from app.services.modelslab import ModelsLabService

V6 = "/api/v6/images"
ENTERPRISE = "/api/v1/enterprise"
SDK = "/api/v1/enterprise/images"


def _paths(name: str) -> list[str]:
    return [f"{V6}/{name}", f"{ENTERPRISE}/{name}", f"{SDK}/{name}"]


class ModelsLabController(Controller):
    @post(_paths("text2img"), status_code=200, operation_id="mlText2Img")
    async def text2img(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.generate("text2img", await request.body(), request.headers, base_url(request))

    @post(_paths("img2img"), status_code=200, operation_id="mlImg2Img")
    async def img2img(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.generate("img2img", await request.body(), request.headers, base_url(request))

    @post(_paths("inpaint"), status_code=200, operation_id="mlInpaint")
    async def inpaint(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.generate("inpaint", await request.body(), request.headers, base_url(request))

    @post([f"{p}/{{job_id:str}}" for p in _paths("fetch")], status_code=200, operation_id="mlFetch")
    async def fetch(self, request: Request, job_id: str, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.fetch(job_id, await request.body(), request.headers, base_url(request))

    @post(_paths("fetch"), status_code=200, operation_id="mlFetchByBody")
    async def fetch_by_body(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.fetch(None, await request.body(), request.headers, base_url(request))

    @post("/api/v3/system_load", status_code=200, operation_id="mlSystemLoad")
    async def system_load(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.system_load(await request.body(), request.headers)

    @post(f"{ENTERPRISE}/system_details", status_code=200, operation_id="mlSystemDetails")
    async def system_details(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.system_details(await request.body(), request.headers)

    @post(f"{ENTERPRISE}/get_all_models", status_code=200, operation_id="mlAllModels")
    async def all_models(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        names = await modelslab.models(await request.body(), request.headers)
        return {"models": [{"model_id": n, "load_data": ""} for n in names], "status": "success"}

    @post("/api/v4/dreambooth/model_list", status_code=200, operation_id="mlModelList")
    async def model_list(self, request: Request, modelslab: ModelsLabService) -> list[dict[str, Any]]:
        names = await modelslab.models(await request.body(), request.headers)
        return [{"model_id": n, "status": "model_ready", "model_name": n} for n in names]

    @post(f"{ENTERPRISE}/schedulers_list", status_code=200, operation_id="mlSchedulers")
    async def schedulers(self, request: Request, modelslab: ModelsLabService) -> dict[str, Any]:
        return await modelslab.schedulers(await request.body(), request.headers)
