"""Aspect ratio tables: the 1 MP reference, scaling to other native sides, grids, limits, ratio spellings."""

from __future__ import annotations

import pytest

from app.services.aspect import FAMILY_SIDES, RATIOS_1MP, base_side, dimensions, normalize


def _ratio(name: str) -> float:
    w, h = name.split(":")
    return int(w) / int(h)


def test_reference_table_is_replicates_in_order() -> None:
    assert list(RATIOS_1MP) == ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
    assert RATIOS_1MP["16:9"] == (1344, 768)
    assert RATIOS_1MP["9:21"] == (640, 1536)
    # Every size is on the 64 grid and close to its ratio, so the next test's "reproduces" is about the whole table.
    for name, (w, h) in RATIOS_1MP.items():
        assert w % 64 == 0 and h % 64 == 0, name
        assert abs(w / h / _ratio(name) - 1) < 0.05, name


@pytest.mark.parametrize("multiple", [16, 64])
def test_1024_reproduces_the_1mp_table(multiple: int) -> None:
    table = dimensions(1024, multiple, 256, 2048)
    assert table == RATIOS_1MP
    assert list(table) == list(RATIOS_1MP)


def test_512_class_on_the_8_grid() -> None:
    table = dimensions(512, 8, 256, 1024)
    assert table["1:1"] == (512, 512)
    assert table["16:9"] == (672, 384)
    assert table["9:16"] == (384, 672)
    assert list(table) == list(RATIOS_1MP)
    for name, (w, h) in table.items():
        assert w % 8 == 0 and h % 8 == 0, name
        assert 256 <= w <= 1024 and 256 <= h <= 1024, name
        assert abs(w / h / _ratio(name) - 1) < 0.05, name


def test_768_class_scales_by_three_quarters() -> None:
    table = dimensions(768, 8, 256, 1536)
    assert table["1:1"] == (768, 768)
    assert table["16:9"] == (1008, 576)


def test_max_side_shrinks_whole_sizes_and_keeps_the_ratio() -> None:
    table = dimensions(1024, 64, 256, 768)
    assert table["1:1"] == (768, 768)
    assert table["16:9"] == (768, 448)
    assert table["9:16"] == (448, 768)
    for name, (w, h) in table.items():
        assert w % 64 == 0 and h % 64 == 0, name
        assert 256 <= w <= 768 and 256 <= h <= 768, name
        assert abs(w / h / _ratio(name) - 1) < 0.05, name


def test_limits_off_the_grid_clamp_onto_it() -> None:
    # 700 and 300 are not multiples of 64: the largest side allowed is 640, the smallest 320.
    table = dimensions(1024, 64, 300, 700)
    for name, (w, h) in table.items():
        assert w % 64 == 0 and h % 64 == 0, name
        assert 320 <= w <= 640 and 320 <= h <= 640, name
    assert table["1:1"] == (640, 640)


def test_min_side_grows_whole_sizes() -> None:
    table = dimensions(512, 8, 512, 1024)
    assert table["1:1"] == (512, 512)
    assert table["16:9"] == (896, 512)  # 672x384 is too short: scaled up until the short side is 512
    for name, (w, h) in table.items():
        assert min(w, h) >= 512 and max(w, h) <= 1024, name


def test_unsatisfiable_limits_clamp_each_side() -> None:
    # 21:9 within 512-768 cannot keep its ratio; it still gets a size the model accepts.
    w, h = dimensions(1024, 64, 512, 768)["21:9"]
    assert (w, h) == (768, 512)


@pytest.mark.parametrize(("args", "message"), [((0, 8, 256, 1024), "positive"), ((512, 64, 400, 440), "no multiple")])
def test_bad_arguments(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dimensions(*args)


@pytest.mark.parametrize("spelling", ["16:9", "16x9", "16X9", "16-9", "16_9", "16/9", " 16 : 9 ", "016:09", "16×9"])
def test_normalize_spellings(spelling: str) -> None:
    assert normalize(spelling) == "16:9"


@pytest.mark.parametrize(
    ("given", "expected"), [(" square ", "square"), ("16:9:1", "16:9:1"), ("", ""), ("a:b", "a:b")]
)
def test_normalize_leaves_what_does_not_parse(given: str, expected: str) -> None:
    assert normalize(given) == expected


def test_normalized_names_index_the_table() -> None:
    assert normalize("21x9") in RATIOS_1MP
    assert normalize("9_16") in RATIOS_1MP


@pytest.mark.parametrize(
    ("family", "side"),
    [
        ("sd", 512),
        ("sdxl", 1024),
        ("sd3", 1024),
        ("flux", 1024),
        ("flux2", 1024),
        ("qwen", 1024),
        ("qwen_image", 1024),
        ("sana", 1024),
        ("pixart", 1024),
        ("wan", 1024),
        ("kandinsky", 1024),
        ("cogview", 1024),
        ("hidream", 1024),
        ("lumina", 1024),
        ("chroma", 1024),
        ("auraflow", 1024),
        (" SDXL ", 1024),
    ],
)
def test_base_side_from_family(family: str, side: int) -> None:
    # The default size disagrees on purpose: a known family wins.
    assert base_side(family, "256x256") == side


def test_every_worker_family_is_known() -> None:
    from app.worker.families import FAMILIES  # a plain dataclass table: no torch

    assert {f.name for f in FAMILIES} <= set(FAMILY_SIDES)


@pytest.mark.parametrize(
    ("family", "size", "side"),
    [
        (None, "512x512", 512),
        (None, "768x768", 768),
        ("generic", "1024x1024", 1024),
        ("something-new", "1344x768", 1016),  # sqrt(1344 * 768) = 1015.97
        (None, "640X480", 554),
        (None, " 256 x 256 ", 256),
    ],
)
def test_base_side_from_default_size(family: str | None, size: str, side: int) -> None:
    assert base_side(family, size) == side


@pytest.mark.parametrize("size", ["", "auto", "512", "0x512", "512x"])
def test_base_side_bad_default_size(size: str) -> None:
    with pytest.raises(ValueError, match="WxH"):
        base_side(None, size)
