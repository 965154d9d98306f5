"""Graphs that declare free spatial dims but run only at their trace-time size (issue 23).

Position embeddings added at one size and window partitions reshaped with the trace-time window count are
exported by ``torch.onnx.export`` with dynamic H/W axes, yet fail at any other size. ``validate`` must say so,
naming the size they run on and what they refused, and still measure their seams as ZEN tiles them (at the
tile); a partition whose window count follows the input (multiples of the window) is a size step, not a fault.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from czregistry.checks import ValidateOptions
from czregistry.errors import BackendError
from czregistry.report import Report, Severity
from czregistry.validate import validate

torch = pytest.importorskip("torch")

TILE = 64


def _head(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        module.weight.mul_(20.0)  # a confident softmax, as a trained head gives
    return module


class PositionEmbedding(torch.nn.Module):
    """conv, + a learned [1, C, 64, 64] position embedding (fixed at the trained size), conv, two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.pos = torch.nn.Parameter(torch.randn(1, 8, TILE, TILE) * 0.1)
        self.b = _head(torch.nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x) + self.pos))


class WindowPartition(torch.nn.Module):
    """Swin-style window attention's partition: reshape into ``n x n`` windows of ``ws`` px and mix within each.

    ``traced=True`` takes the window count from the trace-time size (a Python constant in the graph: only that
    size runs); ``False`` from the input's shape (the count follows the input: multiples of the window run)."""

    def __init__(self, traced: bool, ws: int = 32) -> None:
        super().__init__()
        self.traced, self.ws, self.n = traced, ws, TILE // ws
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.mix = torch.nn.Linear(8, 8)
        self.b = _head(torch.nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        ws = self.ws
        nh, nw = (self.n, self.n) if self.traced else (y.shape[2] // ws, y.shape[3] // ws)
        w = y.reshape(1, 8, nh, ws, nw, ws).permute(0, 2, 4, 3, 5, 1).reshape(1, nh * nw, ws * ws, 8)
        w = w + self.mix(w.mean(dim=2, keepdim=True))  # each window's mean: context within the window only
        y = w.reshape(1, nh, nw, ws, ws, 8).permute(0, 5, 1, 3, 2, 4).reshape(1, 8, nh * ws, nw * ws)
        return self.b(y)


def _package(tmp: Path, name: str, module: torch.nn.Module) -> Path:
    """Exported as czmodel 6.2 does (NHWC wrapper, softmax, opset 18) with **dynamic** batch and H/W axes."""
    from czregistry.package import write_package

    class ChannelsLast(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(x.permute(0, 3, 1, 2)), dim=1).permute(0, 2, 3, 1)

    torch.manual_seed(0)
    buf = io.BytesIO()
    axes = {0: "batch", 1: "h", 2: "w"}
    with torch.no_grad():
        torch.onnx.export(ChannelsLast(module.eval()).eval(), (torch.zeros(1, TILE, TILE, 1),), buf,
                          input_names=["input"], output_names=["output"], opset_version=18, dynamo=False,
                          dynamic_axes={"input": axes, "output": axes})
    meta = {"FormatVersion": "2.1.0", "Id": "3f1a6c1e-8d0b-4f0e-9a57-1b1d7e0c2a00", "ModelName": name,
            "Type": "MultiClassSemanticSegmentation", "Classes": ["a", "b"], "InputShape": [TILE, TILE, 1],
            "OutputShape": [TILE, TILE, 2], "MinOverlap": [8, 8], "Scaling": [1e-6, 1e-6]}
    return write_package(tmp / f"{name}.czann", meta, buf.getvalue())


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fixedgraphs")
    torch.manual_seed(0)
    return {"pos": _package(tmp, "pos", PositionEmbedding()),
            "windows-traced": _package(tmp, "windows-traced", WindowPartition(traced=True)),
            "windows-dynamic": _package(tmp, "windows-dynamic", WindowPartition(traced=False, ws=TILE))}


def _one(report: Report, check: str) -> str:
    found = [f for f in report.findings if f.check == check]
    assert len(found) == 1, report.to_json()
    return found[0].message


@pytest.mark.parametrize("name", ["pos", "windows-traced"])
def test_a_graph_claiming_free_dims_that_runs_only_at_its_trace_size_is_named(
        name: str, packages: dict[str, Path]) -> None:
    from czregistry.package import open_package
    from czregistry.selection import load_session

    path = packages[name]
    with load_session(open_package(path)) as session:
        assert session.signature.inputs[0].shape[1:3] == (None, None)  # the graph really claims any size
        with pytest.raises(BackendError):  # ... and really fails at another one
            session.predict(torch.zeros(1, TILE + 32, TILE + 32, 1).numpy())
    report = validate(path, ValidateOptions(time_budget=120))
    finding = next(f for f in report.findings if f.check == "model.invariance.fixed_size")
    assert finding.severity is Severity.WARNING
    assert finding.message.startswith(f"the graph declares free spatial dims (input [?, ?, ?, 1]) but runs only on "
                                      f"[{TILE}, {TILE}]: it refused all ")
    assert "[63, 63], [62, 62], [61, 61], ... [128, 128]); at [63, 63] the runtime says: " in finding.message
    assert finding.hint is not None and finding.hint.startswith(f"tile at exactly [{TILE}, {TILE}] (leave czreg run")
    m = report.measurements
    assert m["fixed_size"] == [TILE, TILE] and m["accepts_other_sizes"] is False
    # still measured as ZEN tiles it: at its one size, no crash, seams at the declared overlap measured
    assert report.valid and m["seam_error"] is not None, report.to_json()


def test_a_window_partition_that_follows_the_input_runs_on_multiples_of_the_window(
        packages: dict[str, Path]) -> None:
    """The window count from the input's shape, the window the tile: only multiples of the tile run. That
    is a size step (tiles must be multiples of it), not a false claim; each window's mean is context within the
    window, so the seams at the declared overlap are real and validate says so."""
    report = validate(packages["windows-dynamic"], ValidateOptions(time_budget=120))
    m = report.measurements
    assert m["accepts_other_sizes"] is True and m["fixed_size"] is None, report.to_json()
    assert m["step"] == [TILE, TILE]  # nothing smaller ran; twice the tile did
    assert "model.invariance.fixed_size" not in {f.check for f in report.findings}
    assert _one(report, "model.invariance.sizes") == f"accepts other spatial sizes in steps of [{TILE}, {TILE}] (h/w)"
    assert m["stride"] == [TILE, TILE] and m["global_context"] is False  # context within a window only
    border = next(f for f in report.findings if f.check == "model.receptive_field.border")
    assert border.severity is Severity.WARNING and "tiles will show seams" in border.message


@pytest.fixture(scope="module")
def validated(packages: dict[str, Path]) -> dict[str, Report]:
    return {name: validate(packages[name], ValidateOptions(time_budget=120)) for name in ("pos", "windows-traced")}


@pytest.mark.parametrize("name", ["pos", "windows-traced"])
def test_validate_and_smoke_agree_on_a_graph_that_runs_at_one_size(
        name: str, packages: dict[str, Path], validated: dict[str, Report]) -> None:
    """The runtime refuses smoke's whole image, so smoke measures the seams as ZEN tiles such a graph (fixed-size
    tiles centred on the cuts, at the declared overlap) instead of passing with an info line: it fails where
    validate warns, with a seam error within 2x of validate's."""
    from czregistry.run.smoke import smoke_test

    report = validated[name]
    smoke = smoke_test(packages[name], device="cpu")
    border = next(f for f in report.findings if f.check == "model.receptive_field.border")
    assert border.severity is Severity.WARNING and "tiles will show seams" in border.message
    seams = next(f for f in smoke.findings if f.check == "smoke.seams")
    assert seams.severity is Severity.ERROR, smoke.to_json()
    assert seams.message.startswith(f"fixed tile size [{TILE}, {TILE}], overlap [8, 8]: the stitched output differs")
    assert seams.hint is not None and "no overlap or tile removes the seams" in seams.hint
    m = smoke.measurements
    assert m["smoke.seam_method"].endswith("fixed-size tiles centred on the cuts (the graph refused the whole image)")
    assert m["smoke.whole_refused"].startswith("ONNX Runtime failed on input of shape (1, ")
    v, s = report.measurements["seam_error"], m["smoke.seam_error"]
    assert v > 1e-3 and 0.5 <= v / s <= 2, (v, s)
    # the traced window partition also fixes the batch at 1: smoke says so and measures at batch 1
    batch = [f for f in smoke.findings if f.check == "smoke.batch"]
    if name == "windows-traced":
        assert len(batch) == 1 and batch[0].severity is Severity.WARNING
        assert batch[0].message == ("the graph fails at batch 4 but runs at batch 1 (ONNX Runtime failed on input "
                                    f"of shape (4, {TILE}, {TILE}, 1))")
    else:
        assert not batch


def test_position_embedding_seams_get_no_tile_or_overlap_hint(validated: dict[str, Report]) -> None:
    """No overlap or tile removes seams that come from where the tile sits: the error barely falls from the
    declared overlap to the largest one, on a graph that runs only at its tile, and the hint says so instead of
    suggesting a larger tile."""
    report = validated["pos"]
    border = next(f for f in report.findings if f.check == "model.receptive_field.border")
    m = report.measurements
    assert m["min_overlap_needed"] is None and m["seams_depend_on_tile_position"] is True
    assert m["recommended_overlap_seam_error"] > 0.5 * m["seam_error"]
    assert border.hint == (
        f"no overlap or tile removes them: the seam error does not fall with the overlap ({m['seam_error']:.3g} at "
        f"[8, 8], {m['recommended_overlap_seam_error']:.3g} at [{TILE - 1}, {TILE - 1}]) on a graph that runs only at "
        f"[{TILE}, {TILE}], so the output depends on where the tile sits (position embeddings or global context); "
        "such a model cannot be tiled without seams")
    assert "czreg pack --tile" not in border.hint and "MinOverlap" not in border.hint
