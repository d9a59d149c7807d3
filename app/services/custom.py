"""The custom-models API (seed 001): custom models, their training images, LoRA trainings and predictions.

A custom model is a LoRA adapter family of the training base model (``training.base_model``). A training is a job
of the job layer (kind ``lora.training``) run on a training worker through the worker protocol: the job keeps the
training's images and its last checkpoint, so a run lost with its worker (or gateway) goes on from the checkpoint;
it ends with the adapter stored (:mod:`app.store.adapters`) in the transaction that ends the job. A prediction is a
generation job with the adapters of its ``scaleConfigs``, through the same image service as ``/v1/images``.
Everything is owned by the principal that made it; another principal's models do not exist for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from pathlib import Path
from typing import Any

import msgspec
from PIL import Image, ImageOps, UnidentifiedImageError

from app.auth.principals import Principal
from app.config import ModelConfig, Settings
from app.errors import BackendFailed, InvalidRequest, NotFound, PermissionDenied, Unavailable
from app.protocol.custom import (
    CreateModel,
    CreatePrediction,
    CustomModel,
    CustomModelList,
    DataCreated,
    Deleted,
    ErrorInfo,
    Hyperparameters,
    Prediction,
    PredictionCreated,
    Progress,
    RenameModel,
    StartTraining,
    Status,
    Training,
    TrainingImage,
    TrainingStarted,
    TrainingSummary,
)
from app.protocol.images import ImageGenerateRequest, LoraSpec
from app.services.images import ImageService
from app.services.jobs import PROGRESS_WRITE_INTERVAL, Executor, JobService, RunLost, principal_fields
from app.store.adapters import AdapterStore
from app.store.custom import (
    CustomModelRecord,
    CustomModelStore,
    PredictionRecord,
    TrainingImageRecord,
    TrainingRecord,
)
from app.store.jobs import JobRecord
from app.worker.protocol import (
    AdapterFile,
    Checkpoint,
    Done,
    Failed,
    Partial,
    TrainingParams,
    TrainingPlan,
    TrainingStep,
    caption,
    plan,
    trigger_word,
)

log = logging.getLogger("imagegate.custom")

SURFACE = "custom-models"
PREFIX = "/custom-models/v1"
TRAINING = "lora.training"
MAX_IMAGE_BYTES = 10 * 1024 * 1024
"""Largest training image (the seed's 10 MB)."""
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
"""Pillow's format names -> the formats the seed accepts (``jpg`` is JPEG)."""
STATUSES: dict[str, Status] = {
    "queued": "processing",
    "running": "processing",
    "succeeded": "succeeded",
    "failed": "failed",
    "expired": "failed",
    "cancelled": "canceled",
}
"""Job layer status -> the seed's word for it."""
FOREVER = 100 * 365 * 86400.0
"""A training's job is kept (it is the training's history); its files go when it ends."""
FAILURE_CODES = {"invalid_request": "invalid_request", "out_of_memory": "oom", "cancelled": "cancelled"}


def _ts(t: float | None) -> int | None:
    return None if t is None else int(t)


def _owned(record: CustomModelRecord | PredictionRecord | None, principal: Principal) -> bool:
    """Whether ``record`` exists for ``principal``: not deleted, and its own (any for an admin)."""
    return record is not None and record.deleted_at is None and (record.owner == principal.id or principal.admin)


def _hyperparameters(p: TrainingPlan) -> Hyperparameters:
    return Hyperparameters(
        rank=p.rank,
        alpha=p.alpha,
        steps=p.steps,
        learningRate=p.learning_rate,
        resolution=p.resolution,
        batchSize=p.batch_size,
        checkpointEvery=p.checkpoint_every,
    )


def _data_url(path: Path, fmt: str) -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(path.read_bytes()).decode()}"


class CheckedImage(msgspec.Struct, kw_only=True):
    """An uploaded training image, decoded and upright, ready to store."""

    data: bytes
    format: str
    width: int
    height: int


def check_image(data: bytes, max_pixels: int) -> CheckedImage:
    """Decode a training image whole and turn it upright by its EXIF orientation.

    Raises:
        InvalidRequest: not an image, one of another format than webp, png or jpeg, corrupt, or too many pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = FORMATS.get(image.format or "")
            if fmt is None:
                raise InvalidRequest(
                    f"A training image must be webp, png, jpeg or jpg, not {image.format or 'unknown'}.",
                    param="file",
                    code="invalid_image_format",
                )
            if image.width * image.height > max_pixels:
                raise InvalidRequest(
                    f"The image has {image.width}x{image.height} pixels; at most {max_pixels} are accepted.",
                    param="file",
                    code="image_too_large",
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise InvalidRequest(
            "The upload is not an image (webp, png, jpeg or jpg).", param="file", code="invalid_image_format"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"The image is corrupt or truncated: {e}.", param="file", code="invalid_image") from None
    if upright is not image:  # it had an orientation: store it as it is meant to be seen
        out = io.BytesIO()
        upright.save(out, fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
        data = out.getvalue()
    return CheckedImage(data=data, format=fmt, width=upright.width, height=upright.height)


class CustomModelService:
    """Answers every ``/custom-models/v1`` route and runs the trainings (registered with the job layer)."""

    def __init__(
        self,
        settings: Settings,
        store: CustomModelStore,
        jobs: JobService,
        images: ImageService,
        adapter_store: AdapterStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.images = images
        self.adapter_store = adapter_store
        self.clock = clock
        root = Path(settings.data_dir) / "custom-models"
        self.image_dir = root / "images"
        self.preview_dir = root / "previews"
        for directory in (self.image_dir, self.preview_dir):
            directory.mkdir(parents=True, exist_ok=True)
        jobs.register(TRAINING, Executor(run=self._train, room=self._training_room, ended=self._training_ended))

    @property
    def base_model(self) -> ModelConfig:
        return self.settings.training_model()

    # -- models ----------------------------------------------------------------------------------------------------

    async def _model(self, model_id: str, principal: Principal, param: str = "modelId") -> CustomModelRecord:
        """The principal's model (any model for an admin), not deleted; else NotFound."""
        record = await asyncio.to_thread(self.store.model, model_id)
        if not _owned(record, principal):
            raise NotFound(f"No custom model '{model_id}'.", param=param, code="model_not_found")
        return record

    async def _view(self, record: CustomModelRecord) -> CustomModel:
        count, latest = await asyncio.to_thread(
            lambda: (self.store.count_images(record.id), self.store.latest_trained(record.id))
        )
        return CustomModel(
            id=record.id,
            displayName=record.display_name,
            customModelType=record.model_type,
            baseModel=record.base_model,
            imageCount=count,
            latestTrainingId=latest.id if latest else None,
            createdAt=int(record.created_at),
            updatedAt=int(record.updated_at),
        )

    async def create_model(self, req: CreateModel, principal: Principal) -> CustomModel:
        base = self.base_model.name
        if not principal.allows(base):
            message = f"This key may not use the base model '{base}' of custom models."
            raise PermissionDenied(message, param="model", code="model_not_allowed")
        now = self.clock()
        record = CustomModelRecord(
            id=f"cm_{secrets.token_hex(8)}",
            owner=principal.id,
            display_name=req.displayName,
            model_type=req.customModelType,
            base_model=base,
            created_at=now,
            updated_at=now,
        )
        await asyncio.to_thread(self.store.add_model, record)
        return await self._view(record)

    async def get_model(self, model_id: str, principal: Principal) -> CustomModel:
        return await self._view(await self._model(model_id, principal))

    async def list_models(self, principal: Principal, cursor: str | None, limit: int) -> CustomModelList:
        after = await self._model(cursor, principal, "cursor") if cursor else None
        owner = None if principal.admin else principal.id
        rows = await asyncio.to_thread(self.store.models, owner, after, limit + 1)
        page = [await self._view(r) for r in rows[:limit]]
        return CustomModelList(data=page, nextCursor=page[-1].id if len(rows) > limit else None)

    async def rename_model(self, model_id: str, req: RenameModel, principal: Principal) -> CustomModel:
        await self._model(model_id, principal)
        updated = await asyncio.to_thread(
            self.store.update_model, model_id, display_name=req.updatedDisplayName, updated_at=self.clock()
        )
        if updated is None:  # deleted meanwhile
            raise NotFound(f"No custom model '{model_id}'.", param="modelId", code="model_not_found")
        return await self._view(updated)

    async def delete_model(self, model_id: str, principal: Principal) -> Deleted:
        """Soft delete: its trainings and predictions stay; it can no longer be trained or used."""
        await self._model(model_id, principal)
        await asyncio.to_thread(self.store.update_model, model_id, deleted_at=self.clock())
        return Deleted(id=model_id)

    # -- training images -------------------------------------------------------------------------------------------

    async def _read_upload(self, body: AsyncIterator[bytes]) -> CheckedImage:
        chunks, size = [], 0
        async for chunk in body:
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise InvalidRequest(
                    f"A training image may be at most 10 MB ({MAX_IMAGE_BYTES} bytes); this one is larger.",
                    param="file",
                    code="image_too_large",
                )
            chunks.append(chunk)
        if not size:
            raise InvalidRequest("The request body is empty: send the image's bytes.", param="file")
        return await asyncio.to_thread(check_image, b"".join(chunks), self.settings.max_image_pixels)

    def _write(self, data_id: str, image: CheckedImage) -> str:
        name = f"{data_id}_{secrets.token_hex(4)}.{image.format}"
        tmp = self.image_dir / f".{name}.tmp"
        tmp.write_bytes(image.data)
        os.replace(tmp, self.image_dir / name)
        return name

    def _image_view(self, record: TrainingImageRecord, with_data: bool = False) -> TrainingImage:
        view = TrainingImage(
            dataId=record.id,
            format=record.format,  # type: ignore[arg-type]
            width=record.width,
            height=record.height,
            size=record.size,
            caption=record.caption,
            createdAt=int(record.created_at),
            updatedAt=int(record.updated_at),
        )
        if with_data:
            view.dataUrl = _data_url(self.image_dir / record.file, record.format)
        return view

    async def upload_image(
        self, model_id: str, body: AsyncIterator[bytes], caption_text: str | None, principal: Principal
    ) -> DataCreated:
        model = await self._model(model_id, principal)
        image = await self._read_upload(body)
        limit = self.settings.training.max_images
        if await asyncio.to_thread(self.store.count_images, model.id) >= limit:
            raise InvalidRequest(f"A custom model holds at most {limit} training images.", param="modelId")
        now = self.clock()
        data_id = f"data_{secrets.token_hex(8)}"
        name = await asyncio.to_thread(self._write, data_id, image)
        record = TrainingImageRecord(
            id=data_id,
            model_id=model.id,
            file=name,
            format=image.format,
            width=image.width,
            height=image.height,
            size=len(image.data),
            caption=caption_text,
            created_at=now,
            updated_at=now,
        )
        try:
            await asyncio.to_thread(self.store.add_image, record)
        except BaseException:
            (self.image_dir / name).unlink(missing_ok=True)
            raise
        return DataCreated(dataId=data_id)

    async def list_images(self, model_id: str, principal: Principal) -> list[TrainingImage]:
        model = await self._model(model_id, principal)
        return [self._image_view(r) for r in await asyncio.to_thread(self.store.images, model.id)]

    async def _image(self, model_id: str, data_id: str, principal: Principal) -> TrainingImageRecord:
        model = await self._model(model_id, principal)
        record = await asyncio.to_thread(self.store.image, model.id, data_id)
        if record is None:
            raise NotFound(f"No training image '{data_id}' in model '{model_id}'.", param="dataId", code="not_found")
        return record

    async def get_image(self, model_id: str, data_id: str, principal: Principal) -> TrainingImage:
        record = await self._image(model_id, data_id, principal)
        return await asyncio.to_thread(self._image_view, record, True)

    async def replace_image(
        self, model_id: str, data_id: str, body: AsyncIterator[bytes], caption_text: str | None, principal: Principal
    ) -> DataCreated:
        old = await self._image(model_id, data_id, principal)
        image = await self._read_upload(body)
        name = await asyncio.to_thread(self._write, data_id, image)
        record = msgspec.structs.replace(
            old,
            file=name,
            format=image.format,
            width=image.width,
            height=image.height,
            size=len(image.data),
            caption=caption_text if caption_text is not None else old.caption,
            updated_at=self.clock(),
        )
        replaced = await asyncio.to_thread(self.store.replace_image, record)
        gone = old if replaced is not None else record  # deleted meanwhile: the new file has no row
        (self.image_dir / gone.file).unlink(missing_ok=True)
        if replaced is None:
            raise NotFound(f"No training image '{data_id}' in model '{model_id}'.", param="dataId", code="not_found")
        return DataCreated(dataId=data_id)

    async def delete_image(self, model_id: str, data_id: str, principal: Principal) -> Deleted:
        """Hard delete: the row and the file (a training that started with it keeps its own copy)."""
        await self._image(model_id, data_id, principal)
        record = await asyncio.to_thread(self.store.delete_image, model_id, data_id)
        if record is not None:
            (self.image_dir / record.file).unlink(missing_ok=True)
        return Deleted(id=data_id)

    # -- trainings -------------------------------------------------------------------------------------------------

    async def start_training(self, model_id: str, req: StartTraining, principal: Principal) -> TrainingStarted:
        """Queue a training of the model on its images as they are now (they are copied for the training).

        Raises:
            InvalidRequest: too few images, or a base model that cannot be trained.
        """
        model = await self._model(model_id, principal)
        records = await asyncio.to_thread(self.store.images, model.id)
        least = self.settings.training.min_images
        if len(records) < least:
            raise InvalidRequest(
                f"A training needs at least {least} training images; model '{model_id}' has {len(records)}.",
                param="modelId",
                code="not_enough_images",
            )
        details = self.images.pool.details(model.base_model)
        if details is not None and not details.trainable:
            raise InvalidRequest(
                f"The base model '{model.base_model}' ({details.family}) cannot be trained here; LoRA training "
                "supports UNet models with one text encoder (SD 1.x/2.x).",
                param="modelId",
                code="unsupported",
            )
        config = self.settings.training
        resolved = plan(
            req.trainingSpeed,
            len(records),
            req.trainingStrength,
            details.native_side if details else 512,
            max_steps=config.max_steps or None,
            resolution=config.resolution or None,
        )
        now = self.clock()
        training_id = f"trn_{secrets.token_hex(8)}"
        trigger = trigger_word()
        inputs = await asyncio.to_thread(self._copy_images, training_id, records)
        request = {
            "modelId": model.id,
            "triggerWord": trigger,
            "captions": [caption(trigger, r.caption) for r in records],
            "seed": secrets.randbelow(2**31),
            "plan": msgspec.structs.asdict(resolved),
        }
        job = JobRecord(
            id=training_id,
            kind=TRAINING,
            surface=SURFACE,
            owner=model.owner,
            principal=msgspec.json.encode(principal_fields(principal)).decode(),
            model=model.base_model,
            status="queued",
            request=msgspec.json.encode(request).decode(),
            inputs=inputs,
            n=0,
            created_at=now,
            deadline_at=now + self.settings.job_queue_timeout,
            expires_at=now + FOREVER,
            base_url="",
        )
        training = TrainingRecord(
            id=training_id,
            model_id=model.id,
            trigger_word=trigger,
            strength=req.trainingStrength,
            speed=req.trainingSpeed,
            plan=msgspec.json.encode(resolved).decode(),
            created_at=now,
        )
        try:
            await self.jobs.enqueue(job, also=self.store.add_training(training))
        except BaseException:
            self._remove_job_files(training_id)
            raise
        return TrainingStarted(
            trainingId=training_id, status="processing", triggerWord=trigger, hyperparameters=_hyperparameters(resolved)
        )

    def _copy_images(self, training_id: str, records: Sequence[TrainingImageRecord]) -> list[str]:
        names = []
        for k, record in enumerate(records):
            name = f"{training_id}_{k}.{record.format}"
            tmp = self.jobs.inputs_dir / f".{name}.tmp"
            tmp.write_bytes((self.image_dir / record.file).read_bytes())
            os.replace(tmp, self.jobs.inputs_dir / name)
            names.append(name)
        return names

    def _checkpoint(self, training_id: str) -> Path:
        return self.jobs.inputs_dir / f"{training_id}_checkpoint.pt"

    def _remove_job_files(self, training_id: str) -> None:
        for path in self.jobs.inputs_dir.glob(f"{training_id}_*"):
            path.unlink(missing_ok=True)

    async def _training(self, model_id: str, training_id: str, principal: Principal) -> tuple[TrainingRecord, Any]:
        model = await self._model(model_id, principal)
        training = await asyncio.to_thread(self.store.training, training_id)
        job = await asyncio.to_thread(self.jobs.store.get, training_id)
        if training is None or training.model_id != model.id or training.deleted_at is not None or job is None:
            raise NotFound(f"No training '{training_id}' of model '{model_id}'.", param="trainingId", code="not_found")
        return training, job

    async def list_trainings(self, model_id: str, principal: Principal) -> list[TrainingSummary]:
        model = await self._model(model_id, principal)

        def rows() -> list[TrainingSummary]:
            out = []
            for training in self.store.trainings(model.id):
                job = self.jobs.store.get(training.id)
                out.append(TrainingSummary(id=training.id, status=STATUSES[job.status] if job else "failed"))
            return out

        return await asyncio.to_thread(rows)

    def _training_view(self, training: TrainingRecord, job: JobRecord) -> Training:
        """Blocking: reads the training's last progress and its previews."""
        resolved = msgspec.json.decode(training.plan, type=TrainingPlan)
        progress = None
        if job.status == "succeeded":
            progress = Progress(step=resolved.steps, total=resolved.steps, percent=100, loss=None, etaSeconds=0.0)
        elif job.step is not None and job.total_steps:
            last = self.jobs.store.last_event(job.id, "progress")
            eta = None
            if job.status == "running" and last is not None and last.data.get("rate"):
                eta = round((job.total_steps - job.step) / last.data["rate"], 1)
            progress = Progress(
                step=job.step,
                total=job.total_steps,
                percent=min(99, job.step * 100 // job.total_steps),
                loss=last.data.get("loss") if last else None,
                etaSeconds=eta,
            )
        previews = [
            _data_url(path, "png")
            for e in self.jobs.store.events(job.id, type="preview")  # not the many progress events
            if (path := self.preview_dir / e.data["file"]).is_file()
        ]
        return Training(
            id=training.id,
            modelId=training.model_id,
            status=STATUSES[job.status],
            triggerWord=training.trigger_word,
            trainingStrength=training.strength,
            trainingSpeed=training.speed,  # type: ignore[arg-type]
            hyperparameters=_hyperparameters(resolved),
            imageCount=len(msgspec.json.decode(job.request)["captions"]),
            progress=progress,
            previewImages=previews,
            attempts=job.attempts,
            error=ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            createdAt=int(training.created_at),
            completedAt=_ts(job.completed_at),
        )

    async def get_training(self, model_id: str, training_id: str, principal: Principal) -> Training:
        training, job = await self._training(model_id, training_id, principal)
        return await asyncio.to_thread(self._training_view, training, job)

    async def cancel_training(self, model_id: str, training_id: str, principal: Principal) -> Training:
        """Cancel a queued training, or stop a running one at its next optimiser step (no adapter is kept)."""
        training, _ = await self._training(model_id, training_id, principal)
        job = await self.jobs.halt(training_id, principal, kinds=(TRAINING,), param="trainingId")
        return await asyncio.to_thread(self._training_view, training, job)

    async def delete_training(self, model_id: str, training_id: str, principal: Principal) -> Deleted:
        """Soft delete: the training is hidden, not cancelled (as the seed says), and its adapter still serves."""
        await self._training(model_id, training_id, principal)
        await asyncio.to_thread(self.store.delete_training, training_id, self.clock())
        return Deleted(id=training_id)

    # -- running a training (the job layer's executor) -------------------------------------------------------------

    def _training_room(self, running: int) -> list[str]:
        """Base models with more training workers than trainings running here.

        Every served model counts: a custom model keeps the base model it was made on if ``training.base_model``
        changed since.
        """
        devices = self.settings.training.devices
        return [m for m in self.images.served() if len(self.images.pool.trainers(m, devices)) > running]

    def _training_ended(self, job: JobRecord) -> None:
        self._remove_job_files(job.id)

    async def _train(self, job: JobRecord) -> None:
        request = msgspec.json.decode(job.request)
        trainers = self.images.pool.trainers(job.model, self.settings.training.devices)
        if not trainers:
            raise Unavailable(f"No training worker for '{job.model}' is ready.", retry_after=5)
        backend = trainers[0].backend
        checkpoint = self._checkpoint(job.id)
        paths = [self.jobs.inputs_dir / name for name in job.inputs]
        resume = checkpoint if checkpoint.is_file() else None
        params = TrainingParams(
            model=job.model,
            plan=msgspec.convert(request["plan"], TrainingPlan),
            seed=request["seed"],
            trigger_word=request["triggerWord"],
            captions=request["captions"],
            image_bytes=[p.stat().st_size for p in paths],
            checkpoint_bytes=resume.stat().st_size if resume else 0,
            preview_every=self.settings.training.preview_every,
            request_id=job.id,
        )
        adapter: bytes | None = None
        last_write, first_step = 0.0, None
        async with AsyncExitStack() as stack:
            sent = [*paths, *([resume] if resume else [])]
            handles = [stack.enter_context(open(p, "rb")) for p in sent]  # noqa: ASYNC230, SIM115
            events = await stack.enter_async_context(aclosing(backend.train(params, handles)))  # type: ignore[attr-defined]
            try:
                async for event in events:
                    if isinstance(event, TrainingStep):
                        now = time.monotonic()
                        if first_step is None:
                            first_step = (now, event.step - 1)
                        if event.step == event.total or now - last_write >= PROGRESS_WRITE_INTERVAL:
                            last_write = now
                            elapsed = now - first_step[0]
                            rate = (event.step - first_step[1]) / elapsed if elapsed > 0 else None
                            await self.jobs.progress(job, event.step, event.total, loss=event.loss, rate=rate)
                    elif isinstance(event, Checkpoint):
                        await asyncio.to_thread(_write_atomic, checkpoint, event.data)
                    elif isinstance(event, Partial):
                        name = f"{job.id}_preview_{event.partial_index}.png"
                        await asyncio.to_thread(_write_atomic, self.preview_dir / name, event.data)
                        await self.jobs.add_event(job, "preview", file=name, step=event.partial_index)
                    elif isinstance(event, AdapterFile):
                        adapter = event.data
                    elif isinstance(event, Failed):
                        code = FAILURE_CODES.get(event.kind, "internal")
                        await self.jobs.end(job.id, "failed", worker=self.jobs.worker_id, error=(code, event.message))
                        return
                    elif isinstance(event, Done):
                        break
            except BackendFailed as e:
                raise RunLost(e.message) from None
        if adapter is None:
            raise RunLost("the worker ended the training without its adapter")
        await self._trained(job, request, adapter)

    async def _trained(self, job: JobRecord, request: dict[str, Any], adapter: bytes) -> None:
        digest = hashlib.sha256(adapter).hexdigest()
        target = self.adapter_store.path(digest)
        if not target.exists():
            await asyncio.to_thread(_write_atomic, target, adapter)
        model = await asyncio.to_thread(self.store.model, request["modelId"])
        now = self.clock()
        row = {
            "id": f"ad_{secrets.token_hex(8)}",
            "model": job.model,
            "name": model.display_name if model else request["modelId"],
            "trigger_word": request["triggerWord"],
            "digest": digest,
            "size": len(adapter),
            "owner": job.owner,
            "source": "training",
            "created_at": now,
        }
        ended = await self.jobs.end(
            job.id,
            "succeeded",
            worker=self.jobs.worker_id,
            result=msgspec.json.encode({"adapterId": row["id"]}).decode(),
            also=self.store.trained(job.id, row),
        )
        if ended is None:
            log.warning("training %s ended here after its lease was lost; its adapter is not kept", job.id)

    # -- predictions -----------------------------------------------------------------------------------------------

    async def _loras(self, req: CreatePrediction, principal: Principal) -> tuple[str, list[LoraSpec], list[str]]:
        """The base model, the adapters of ``scaleConfigs`` (in ordinal order), and the warnings for the prompt."""
        keys = list(req.scaleConfigs)
        if any(not k.isdigit() for k in keys):
            raise InvalidRequest(
                'scaleConfigs is keyed by ordinal strings ("1", "2", ...).', param="scaleConfigs", code="invalid_key"
            )
        base, loras, warnings = None, [], []
        for key in sorted(keys, key=int):
            config = req.scaleConfigs[key]
            where = f"scaleConfigs.{key}"
            record = await asyncio.to_thread(self.store.model, config.modelId)
            if not _owned(record, principal):
                raise InvalidRequest(
                    f"{where}: no custom model '{config.modelId}'.", param=f"{where}.modelId", code="model_not_found"
                )
            if config.trainingId:
                training = await asyncio.to_thread(self.store.training, config.trainingId)
                if training is None or training.model_id != record.id or training.deleted_at is not None:
                    raise InvalidRequest(
                        f"{where}: model '{record.id}' has no training '{config.trainingId}'.",
                        param=f"{where}.trainingId",
                        code="training_not_found",
                    )
                if training.adapter_id is None:
                    raise InvalidRequest(
                        f"{where}: training '{training.id}' has not succeeded.",
                        param=f"{where}.trainingId",
                        code="training_not_ready",
                    )
            else:
                training = await asyncio.to_thread(self.store.latest_trained, record.id)
                if training is None:
                    raise InvalidRequest(
                        f"{where}: model '{record.id}' has no training that succeeded yet.",
                        param=f"{where}.modelId",
                        code="training_not_ready",
                    )
            if base not in (None, record.base_model):
                raise InvalidRequest(
                    f"{where}: model '{record.id}' adapts '{record.base_model}', the others '{base}'.",
                    param=f"{where}.modelId",
                )
            base = record.base_model
            loras.append(LoraSpec(id=training.adapter_id, scale=config.scale))  # type: ignore[arg-type]
            if training.trigger_word.lower() not in req.prompt.lower():
                warnings.append(
                    f"The prompt does not contain the trigger word '{training.trigger_word}' of model '{record.id}' "
                    f"({record.display_name}); it runs, but the model's style may barely show."
                )
        return base, loras, warnings  # type: ignore[return-value]

    def _size(self, model: ModelConfig, req: CreatePrediction) -> str | None:
        """The requested size clamped to what the base model accepts, on its grid (None: its default)."""
        if req.image_size is None:
            return None

        def side(value: int) -> int:
            value = min(max(value, model.min_side), model.max_side)
            return max(model.size_multiple, value // model.size_multiple * model.size_multiple)

        return f"{side(req.image_size.width)}x{side(req.image_size.height)}"

    async def create_prediction(self, req: CreatePrediction, principal: Principal, base_url: str) -> PredictionCreated:
        base, loras, warnings = await self._loras(req, principal)
        model = self.images.config(base)
        wire = ImageGenerateRequest(
            model=base,
            prompt=req.prompt,
            n=req.num_images,
            size=self._size(model, req),
            seed=req.seed,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            output_format=req.output_format,
            response_format="url",
            loras=loras,
        )
        prediction_id = f"pred_{secrets.token_hex(10)}"
        record = PredictionRecord(
            id=prediction_id,
            owner=principal.id,
            scale_configs=msgspec.json.encode(req.scaleConfigs).decode(),
            warnings=warnings,
            created_at=self.clock(),
        )
        await self.jobs.submit(
            "image.generation",
            wire,
            principal,
            base_url,
            surface=SURFACE,
            job_id=prediction_id,
            also=self.store.add_prediction(record),
        )
        return PredictionCreated(predictionId=prediction_id, warnings=warnings)

    async def _prediction(self, prediction_id: str, principal: Principal) -> tuple[PredictionRecord, JobRecord]:
        record = await asyncio.to_thread(self.store.prediction, prediction_id)
        if not _owned(record, principal):
            raise NotFound(f"No prediction '{prediction_id}'.", param="predictionId", code="not_found")
        job = await asyncio.to_thread(self.jobs.store.get, prediction_id)
        if job is None:
            raise NotFound(
                f"The prediction '{prediction_id}' and its images are past their retention.",
                param="predictionId",
                code="expired",
            )
        return record, job

    async def get_prediction(self, prediction_id: str, principal: Principal) -> Prediction:
        record, job = await self._prediction(prediction_id, principal)
        view = self.jobs.view(job)
        progress = None
        if view.progress is not None:
            p = view.progress
            progress = Progress(step=p.step, total=p.total, percent=p.percent, loss=None, etaSeconds=p.eta_seconds)
        return Prediction(
            id=record.id,
            status=STATUSES[job.status],
            outputImages=[d.url for d in view.result.data if d.url] if view.result else [],
            warnings=record.warnings,
            progress=progress,
            error=ErrorInfo(code=view.error.code, message=view.error.message) if view.error else None,
            createdAt=int(record.created_at),
            completedAt=_ts(job.completed_at),
            expiresAt=int(job.expires_at),
        )

    async def delete_prediction(self, prediction_id: str, principal: Principal) -> Deleted:
        """Soft delete: hidden from now on, kept in the history (its job runs on if it still does)."""
        await self._prediction(prediction_id, principal)
        await asyncio.to_thread(self.store.delete_prediction, prediction_id, self.clock())
        return Deleted(id=prediction_id)

    # -- seed 000's API ----------------------------------------------------------------------------------------------

    async def trained_models(self, principal: Principal) -> list[tuple[CustomModelRecord, TrainingRecord]]:
        """The principal's custom models that can generate (a training succeeded), with that training."""

        def rows() -> list[tuple[CustomModelRecord, TrainingRecord]]:
            out = []
            for model in self.store.models(principal.id, None, 1000):
                latest = self.store.latest_trained(model.id)
                if latest is not None:
                    out.append((model, latest))
            return out

        return await asyncio.to_thread(rows)

    async def trained_model(self, model_id: str, principal: Principal) -> tuple[CustomModelRecord, TrainingRecord]:
        """One of :meth:`trained_models`; NotFound for any other."""
        model = await self._model(model_id, principal, "model")
        latest = await asyncio.to_thread(self.store.latest_trained, model.id)
        if latest is None:
            raise NotFound(f"The custom model '{model_id}' has no training that succeeded yet.", param="model")
        return model, latest


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
