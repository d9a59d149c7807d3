"""The worker protocol: sizes, preview positions, scheduler names and the length-prefixed msgpack frames."""

from __future__ import annotations

import pytest

from app.worker.protocol import (
    FRAME_HEADER,
    SCHEDULERS,
    Done,
    Failed,
    GenerationParams,
    Image,
    Partial,
    Progress,
    Started,
    canonical_scheduler,
    decode_event,
    decode_params,
    encode_frame,
    encode_params,
    parse_size,
    preview_steps,
)

# -- parse_size -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512x512", (512, 512)),
        ("1024x768", (1024, 768)),
        ("64X32", (64, 32)),
        (" 64X32 ", (64, 32)),  # surrounding whitespace is stripped, the separator is case-insensitive
        ("1x1", (1, 1)),
        ("0064x0032", (64, 32)),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "64", "x64", "64x", "0x64", "64x0", "-1x5", "5x-1", "+1x5", "64x64x2", "64 x 64", "auto", "1.5x2", "axb"],
)
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


# -- preview_steps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "count", "expected"),
    [
        (20, 2, [7, 13]),
        (20, 3, [5, 10, 15]),
        (1, 3, [1, 1, 1]),
        (2, 3, [1, 1, 2]),
        (10, 0, []),
        (100, 3, [25, 50, 75]),
        (4, 1, [2]),
    ],
)
def test_preview_steps_positions(steps, count, expected):
    assert preview_steps(steps, count) == expected


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 10, 20, 50, 99, 150])
@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_preview_steps_invariants(steps, count):
    marks = preview_steps(steps, count)
    assert len(marks) == count
    assert all(1 <= m <= steps for m in marks)
    assert marks == sorted(marks)


@pytest.mark.parametrize("steps", [4, 10, 20, 50])
def test_preview_steps_are_distinct_and_before_the_end_when_steps_allow(steps):
    marks = preview_steps(steps, 3)
    assert len(set(marks)) == 3
    assert marks[-1] < steps


# -- schedulers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_canonical_scheduler_short_names(name):
    assert canonical_scheduler(name) == name
    assert canonical_scheduler(f"  {name.upper()} ") == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DDIMScheduler", "ddim"),
        ("ddimscheduler", "ddim"),
        ("EULERANCESTRALDISCRETESCHEDULER", "euler_a"),
        ("EulerDiscreteScheduler", "euler"),
        ("UniPCMultistepScheduler", "unipc"),
        # two short names share the class; the first one declared wins
        ("DPMSolverMultistepScheduler", "dpmpp_2m"),
    ],
)
def test_canonical_scheduler_class_names(name, expected):
    assert canonical_scheduler(name) == expected


@pytest.mark.parametrize("name", ["", "warp", "DDIM Scheduler", "ddim_scheduler"])
def test_canonical_scheduler_unknown(name):
    assert canonical_scheduler(name) is None


def test_every_scheduler_class_resolves_to_a_short_name_with_that_class():
    for cls, _extra in SCHEDULERS.values():
        short = canonical_scheduler(cls)
        assert short is not None
        assert SCHEDULERS[short][0] == cls


# -- frames -----------------------------------------------------------------------------------------------------

EVENTS = [
    Started(queue_seconds=0.25, prompt_tokens=7),
    Started(queue_seconds=0.0),
    Progress(step=3, total=20),
    Partial(image_index=1, partial_index=2, data=b"\x89PNG\x00\xff" * 10),
    Image(index=0, data=bytes(range(256)), seed=42),
    Done(seconds=1.5),
    Failed(message="boom"),
    Failed(message="too big", kind="invalid_request", param="size"),
    Failed(message="oom", kind="out_of_memory"),
    Failed(message="gone", kind="cancelled"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_frame_round_trip(event):
    frame = encode_frame(event)
    assert FRAME_HEADER.size == 4
    (length,) = FRAME_HEADER.unpack(frame[:4])
    assert length == len(frame) - 4
    decoded = decode_event(frame[4:])
    assert type(decoded) is type(event)
    assert decoded == event


def test_bytes_travel_raw_not_base64():
    data = bytes(range(256)) * 4
    frame = encode_frame(Image(index=0, data=data, seed=1))
    assert data in frame  # msgpack bin: the raw bytes appear verbatim
    assert len(frame) < len(data) + 64


def test_concatenated_frames_split_by_header():
    stream = b"".join(encode_frame(e) for e in EVENTS)
    out = []
    while stream:
        (length,) = FRAME_HEADER.unpack(stream[:4])
        out.append(decode_event(stream[4 : 4 + length]))
        stream = stream[4 + length :]
    assert out == EVENTS


def test_failed_defaults_to_internal():
    decoded = decode_event(encode_frame(Failed(message="x"))[4:])
    assert decoded.kind == "internal"
    assert decoded.param is None


def test_params_round_trip_and_work():
    params = GenerationParams(
        model="m",
        prompt="a cat",
        width=512,
        height=256,
        steps=20,
        guidance=7.5,
        seed=123,
        n=2,
        negative_prompt="blurry",
        scheduler="euler",
        partial_images=2,
        output_format="webp",
        output_compression=80,
        request_id="img_1",
    )
    head = encode_params(params)
    (length,) = FRAME_HEADER.unpack(head[: FRAME_HEADER.size])
    assert length == len(head) - FRAME_HEADER.size
    assert decode_params(head[FRAME_HEADER.size :]) == params
    assert params.work == 512 * 256 * 20 * 2


def test_img2img_work_counts_only_the_steps_run():
    base = {"model": "m", "prompt": "p", "width": 64, "height": 64, "steps": 20, "guidance": 7.5, "seed": 1}
    assert GenerationParams(**base, task="img2img", strength=0.5).work == 64 * 64 * 10
    assert GenerationParams(**base, task="inpaint", strength=0.5).work == 64 * 64 * 20


# -- no torch in the gateway ------------------------------------------------------------------------------------
