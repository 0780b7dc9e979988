"""Planning a LLaVA: the image's positions in the context, the vision part in memory, a context too small for an image."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.core.errors import BedsideError
from toolkit.model.facts import read_facts
from toolkit.plan.planner import MIN_TEXT_WITH_IMAGE, make_plan
from toolkit.target.profiles import load_profile

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def llava_facts():
    return read_facts(str(FIXTURES / "llava-1.5-7b"))


def test_memory_counts_the_vision_part_and_the_image_positions(llava_facts):
    plan = make_plan(llava_facts, load_profile("jetson4gb"), "llava")
    memory = plan.chosen.memory
    assert memory.detail["param.image_positions"] == 576  # (336 / 14)^2, the "default" strategy drops CLS
    assert memory.vision_bytes == sum(v for k, v in memory.detail.items() if k.startswith("vision."))
    assert memory.detail["vision.image_embeddings"] == 576 * 4096 * 4  # one image's projected features, f32
    assert plan.chosen.vision_dtype in ("f16", "q8_0")


def test_a_context_that_cannot_hold_an_image_is_refused(llava_facts):
    profile = load_profile("jetson4gb")
    with pytest.raises(BedsideError, match="cannot hold one image") as error:
        make_plan(llava_facts, profile, "llava", context=576 + MIN_TEXT_WITH_IMAGE - 1)
    assert str(576 + MIN_TEXT_WITH_IMAGE) in str(error.value)
    assert make_plan(llava_facts, profile, "llava", context=576 + MIN_TEXT_WITH_IMAGE).context_length == 640
