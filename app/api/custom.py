"""``/custom-models/v1``: the custom-models API (seed 001), answered by :class:`CustomModelService`. No logic here.

Training images travel as the raw request body (their bytes, any content type); an optional ``caption`` query
parameter adds to the trigger word in the image's training caption.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, delete, get, patch, post, put
from litestar.params import Parameter

from app.api.images import base_url
from app.protocol.custom import (
    CreateModel,
    CreatePrediction,
    CustomModel,
    CustomModelList,
    DataCreated,
    Deleted,
    Prediction,
    PredictionCreated,
    RenameModel,
    StartTraining,
    Training,
    TrainingImage,
    TrainingStarted,
    TrainingSummary,
)
from app.services.custom import MAX_IMAGE_BYTES, PREFIX, CustomModelService

Limit = Annotated[int, Parameter(ge=1, le=100)]
Caption = Annotated[str | None, Parameter(max_length=1000)]
MODEL = "/models/{model_id:str}"
UPLOAD_LIMIT = MAX_IMAGE_BYTES + (1 << 20)
"""Bodies a little past the seed's 10 MB are read, so that an oversize image gets a 400 that says so."""


class CustomModelsController(Controller):
    path = PREFIX

    @post("/models", status_code=201, operation_id="customCreateModel")
    async def create_model(self, request: Request, data: CreateModel, custom: CustomModelService) -> CustomModel:
        return await custom.create_model(data, request.user)

    @get("/models", operation_id="customListModels")
    async def list_models(
        self, request: Request, custom: CustomModelService, cursor: str | None = None, limit: Limit = 20
    ) -> CustomModelList:
        return await custom.list_models(request.user, cursor, limit)

    @get(MODEL, operation_id="customGetModel")
    async def get_model(self, request: Request, model_id: str, custom: CustomModelService) -> CustomModel:
        return await custom.get_model(model_id, request.user)

    @patch(MODEL, operation_id="customRenameModel")
    async def rename_model(
        self, request: Request, model_id: str, data: RenameModel, custom: CustomModelService
    ) -> CustomModel:
        return await custom.rename_model(model_id, data, request.user)

    @delete(MODEL, status_code=200, operation_id="customDeleteModel")
    async def delete_model(self, request: Request, model_id: str, custom: CustomModelService) -> Deleted:
        return await custom.delete_model(model_id, request.user)

    @post(f"{MODEL}/data", status_code=201, operation_id="customUploadData", request_max_body_size=UPLOAD_LIMIT)
    async def upload_data(
        self, request: Request, model_id: str, custom: CustomModelService, caption: Caption = None
    ) -> DataCreated:
        return await custom.upload_image(model_id, request.stream(), caption, request.user)

    @get(f"{MODEL}/data", operation_id="customListData")
    async def list_data(self, request: Request, model_id: str, custom: CustomModelService) -> list[TrainingImage]:
        return await custom.list_images(model_id, request.user)

    @get(f"{MODEL}/data/{{data_id:str}}", operation_id="customGetData")
    async def get_data(
        self, request: Request, model_id: str, data_id: str, custom: CustomModelService
    ) -> TrainingImage:
        return await custom.get_image(model_id, data_id, request.user)

    @put(f"{MODEL}/data/{{data_id:str}}", operation_id="customReplaceData", request_max_body_size=UPLOAD_LIMIT)
    async def replace_data(
        self, request: Request, model_id: str, data_id: str, custom: CustomModelService, caption: Caption = None
    ) -> DataCreated:
        return await custom.replace_image(model_id, data_id, request.stream(), caption, request.user)

    @delete(f"{MODEL}/data/{{data_id:str}}", status_code=200, operation_id="customDeleteData")
    async def delete_data(self, request: Request, model_id: str, data_id: str, custom: CustomModelService) -> Deleted:
        return await custom.delete_image(model_id, data_id, request.user)

    @post(f"{MODEL}/trainings", status_code=201, operation_id="customStartTraining")
    async def start_training(
        self, request: Request, model_id: str, custom: CustomModelService, data: StartTraining | None = None
    ) -> TrainingStarted:
        return await custom.start_training(model_id, data or StartTraining(), request.user)

    @get(f"{MODEL}/trainings", operation_id="customListTrainings")
    async def list_trainings(
        self, request: Request, model_id: str, custom: CustomModelService
    ) -> list[TrainingSummary]:
        return await custom.list_trainings(model_id, request.user)

    @get(f"{MODEL}/trainings/{{training_id:str}}", operation_id="customGetTraining")
    async def get_training(
        self, request: Request, model_id: str, training_id: str, custom: CustomModelService
    ) -> Training:
        return await custom.get_training(model_id, training_id, request.user)

    @post(f"{MODEL}/trainings/{{training_id:str}}/cancel", status_code=200, operation_id="customCancelTraining")
    async def cancel_training(
        self, request: Request, model_id: str, training_id: str, custom: CustomModelService
    ) -> Training:
        return await custom.cancel_training(model_id, training_id, request.user)

    @delete(f"{MODEL}/trainings/{{training_id:str}}", status_code=200, operation_id="customDeleteTraining")
    async def delete_training(
        self, request: Request, model_id: str, training_id: str, custom: CustomModelService
    ) -> Deleted:
        return await custom.delete_training(model_id, training_id, request.user)

    @post("/predictions", status_code=201, operation_id="customCreatePrediction")
    async def create_prediction(
        self, request: Request, data: CreatePrediction, custom: CustomModelService
    ) -> PredictionCreated:
        return await custom.create_prediction(data, request.user, base_url(request))

    @get("/predictions/{prediction_id:str}", operation_id="customGetPrediction")
    async def get_prediction(self, request: Request, prediction_id: str, custom: CustomModelService) -> Prediction:
        return await custom.get_prediction(prediction_id, request.user)

    @delete("/predictions/{prediction_id:str}", status_code=200, operation_id="customDeletePrediction")
    async def delete_prediction(self, request: Request, prediction_id: str, custom: CustomModelService) -> Deleted:
        return await custom.delete_prediction(prediction_id, request.user)
