"""`oodflow analyze`: the figures exist and have the expected grid sizes; the captions' verdicts
follow from known numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.config import PixelFlowConfig
from models.coupling import AffineCoupling
from models.flows import PixelFlow
from models.transforms import Squeeze
from training.analyze import (
    analyze,
    analyze_model,
    coadaptation_sentence,
    edge_caption,
    edge_verdict,
    measure,
    prediction_caption,
    prediction_verdict,
    to_grid,
    trace_couplings,
)
from training.data import load_dataset


def _flow(mask: str) -> PixelFlow:
    cfg = PixelFlowConfig(
        mask=mask,  # type: ignore[arg-type]
        width=4,
        depth=0,
        num_scales=2,
        couplings_per_scale=2,
        channel_couplings=1,
        final_couplings=2,
    )
    model = PixelFlow(cfg).eval()
    with torch.no_grad():  # leave the identity initialisation so s and t are not all zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_to_grid_undoes_squeeze() -> None:
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    squeezed, _ = Squeeze()(x)
    twice, _ = Squeeze()(squeezed)
    np.testing.assert_array_equal(to_grid(squeezed[0]), np.concatenate(list(x[0].numpy()), axis=1))
    np.testing.assert_array_equal(to_grid(twice[0]), np.concatenate(list(x[0].numpy()), axis=1))
    assert to_grid(torch.zeros(1, 5, 7)).shape == (5, 7)


def test_trace_records_every_coupling_in_order() -> None:
    model = _flow("horizontal")
    images = torch.from_numpy(load_dataset("mnist", limit=2, seed=0).images)
    traces = trace_couplings(model, images)
    assert len(traces) == sum(isinstance(m, AffineCoupling) for m in model.modules()) == 5
    assert [t.mask for t in traces] == ["horizontal", "horizontal", "channel", "horizontal", "horizontal"]
    first = traces[0]
    # s and t vanish where the coupling does not transform; the output equals the input there
    assert torch.all(first.s * (1 - first.transformed) == 0)
    torch.testing.assert_close(
        first.outputs * (1 - first.transformed), first.inputs * (1 - first.transformed)
    )
    torch.testing.assert_close(first.outputs, first.inputs * torch.exp(first.s) + first.t)


@pytest.mark.parametrize("mask", ["horizontal", "checkerboard"])
def test_figures_have_the_expected_grids(tmp_path: Path, mask: str) -> None:
    model = _flow(mask)
    images = np.concatenate(
        [
            load_dataset("fashion-mnist:test", limit=2, seed=0).images,
            load_dataset("mnist", limit=2, seed=0).images,
        ]
    )
    grids = analyze_model(model, images, ["in 1", "in 2", "OOD 1", "OOD 2"], tmp_path, "tiny")
    assert grids == {
        "latent.png": (2, 4),
        "st_maps.png": (8, 5),
        "coupling_outputs.png": (4, 6),
        "coadaptation.png": (4, 3),
    }
    sizes = {name: Image.open(tmp_path / name).size for name in grids}
    # more columns -> wider, more rows -> taller
    assert sizes["coupling_outputs.png"][0] > sizes["coadaptation.png"][0]
    assert sizes["st_maps.png"][1] > sizes["coupling_outputs.png"][1]


def test_analyze_an_exported_artifact(quick_repository: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "figures"
    doc = tmp_path / "analysis.md"
    grids = analyze(quick_repository["fmnist-pixel-realnvp-quick"], out, count=1, markdown=doc)
    assert grids["latent.png"] == (2, 2) and "coadaptation.png" in grids
    text = doc.read_text()
    for name in grids:
        assert f"](figures/{name})" in text and (out / name).is_file()
    with pytest.raises(ValueError, match="pixel flow"):
        analyze(quick_repository["fmnist-embedding-quick"], tmp_path / "x")


@pytest.mark.parametrize(
    "own, control, verdict",
    [
        (0.45, 0.10, "follows"),
        (0.25, 0.20, "no more than control"),  # the layout every image shares, not its own edges
        (-0.21, 0.05, "opposes"),  # the old caption said "t follows the outline" on these numbers
        (-0.05, 0.00, "no more than control"),
    ],
)
def test_edge_verdict(own: float, control: float, verdict: str) -> None:
    assert edge_verdict(own, control) == verdict


def test_edge_caption_claims_only_what_the_numbers_show() -> None:
    text = edge_caption("|t| of the first coupling", (-0.21, -0.30), (0.02, 0.01))
    assert "-0.21" in text and "-0.30" in text and "another image" in text
    assert "*anti*-correlated" in text and "follows the input's own edges" not in text
    text = edge_caption("|z|", (0.45, 0.12), (0.10, 0.10))
    assert "|z| follows the input's own edges on in-distribution images" in text
    assert "no more than another image's edges on OOD images" in text


def test_prediction_verdict_against_blank_and_mean_guesses() -> None:
    # within 10% of the best guess is no better than it
    assert prediction_verdict(33, {"all-black guess": 35, "mean of the visible pixels": 40}) == "no better"
    assert prediction_verdict(20, {"all-black guess": 35, "mean of the visible pixels": 40}) == "better"
    assert prediction_verdict(67, {"all-black guess": 63, "mean of the visible pixels": 50}) == "worse"
    clause, verdicts = prediction_caption(
        "coupling 1", (20.0, 33.0), {"all-black guess": (63.0, 35.0), "mean": (45.0, 40.0)}
    )
    assert verdicts == ("better", "no better")
    assert "better than every guess on in-distribution images" in clause
    assert "no better than the best guess on OOD images" in clause


def test_measure_on_a_real_flow_writes_a_caption_per_figure() -> None:
    model = _flow("checkerboard")
    images = np.concatenate(
        [
            load_dataset("fashion-mnist:test", limit=4, seed=0).images,
            load_dataset("mnist", limit=4, seed=0).images,
        ]
    )
    labels = [f"in {i}" for i in range(4)] + [f"OOD {i}" for i in range(4)]
    notes = measure(model, images, labels)
    assert set(notes) == {"latent.png", "st_maps.png", "coupling_outputs.png", "coadaptation.png"}
    assert all(text.startswith("Measured:") for text in notes.values())
    assert "all-black guess" in notes["coadaptation.png"] and "§6" in notes["coadaptation.png"]


def test_coadaptation_sentence() -> None:
    assert "consistent with co-adaptation" in coadaptation_sentence(("better", "better"))
    mixed = coadaptation_sentence(("better", "no better"))
    assert "on in-distribution images only" in mixed and "not on OOD images" in mixed
    assert "no sign of co-adaptation" in coadaptation_sentence(("no better", "worse"))
