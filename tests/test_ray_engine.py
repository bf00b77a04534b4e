"""``segany annotate --ray``: a local Ray instance gives the same masks as the in-process run.

Skipped when Ray Data is not installed (``pip install "segany[ray]"``). Starting Ray takes ~10-30 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_engine_annotate import make_images, manifest_rows

pytest.importorskip("ray.data")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, at start-up

from segany.automatic.folder import collect_images  # noqa: E402
from segany.engine.annotate import AnnotateSettings, annotate  # noqa: E402
from segany.engine.ray_backend import RayOptions  # noqa: E402
from segany.io.sa1b import iter_sa1b_masks, read_sa1b  # noqa: E402

GENERATOR = {
    "points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9,
    "min_mask_region_area": 0, "max_mask_region_fraction": 0.95, "output_mode": "coco_rle",
}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """Run the in-process model on one thread, as Ray's one-CPU actors do: the same float sums."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_matches_in_process(tmp_path, tiny_checkpoint, local_ray, one_thread):
    make_images(tmp_path / "images", 4)
    images = collect_images([str(tmp_path / "images")], tmp_path / "out")
    settings = AnnotateSettings(dict(GENERATOR))
    local = annotate(images, tmp_path / "local", settings, model=str(tiny_checkpoint), progress=False)
    on_ray = annotate(images, tmp_path / "ray", settings, model=str(tiny_checkpoint), progress=False,
                      ray=RayOptions(actors=1))
    assert (local.done, on_ray.done, on_ray.failed) == (4, 4, 0)
    assert local.masks == on_ray.masks and local.masks > 0
    for i in range(4):
        a_info, a_masks = iter_sa1b_masks(tmp_path / "local" / "sa1b" / f"img{i}.json")
        b_info, b_masks = iter_sa1b_masks(tmp_path / "ray" / "sa1b" / f"img{i}.json")
        assert a_info == b_info
        assert len(a_masks) == len(b_masks)
        for a, b in zip(a_masks, b_masks):
            np.testing.assert_array_equal(a, b)
        a_anns, b_anns = read_sa1b(tmp_path / "local" / "sa1b" / f"img{i}.json")[1], \
            read_sa1b(tmp_path / "ray" / "sa1b" / f"img{i}.json")[1]
        assert [x["predicted_iou"] for x in a_anns] == pytest.approx([x["predicted_iou"] for x in b_anns], abs=1e-5)
        assert (tmp_path / "ray" / "sa1b" / f"img{i}.png").read_bytes() == Path(images[i]).read_bytes()
    assert manifest_rows(tmp_path / "ray", "SELECT backend FROM runs") == [("ray:local",)]

    again = annotate(images, tmp_path / "ray", settings, model=str(tiny_checkpoint), progress=False,
                     ray=RayOptions(actors=1))  # resumable on Ray too: nothing left to do, Ray not even asked
    assert (again.done, again.skipped) == (0, 4)
