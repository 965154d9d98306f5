"""The validator's claims on architectures nobody here designed, checked against whole-image inference.

Every network comes from the library users train with (segmentation_models_pytorch, torchvision, Keras; see
``tests/corpus.py``), with random weights; PyTorch networks are packed directly from the module by
``czregistry.pack``, Keras ones exported with tf2onnx. For each one the test asserts
the verdict and the measured stride and halo, then **checks the claims by running the model**: tiled inference
(our runner, tiles on the measured stride grid) at the measured halo must equal whole-image inference within the
tolerance; at the declared overlap, where a border warning says tiles will show seams, they must differ; for a
model called global, no overlap may make them equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from czregistry.checks import ValidateOptions
from czregistry.report import Report, Severity
from czregistry.validate import validate

pytest.importorskip("segmentation_models_pytorch", reason="the corpus needs segmentation_models_pytorch")

from tests.corpus import CORPUS, export_onnx, metadata

TOL = 1e-4


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``corpus(name)`` -> the entry packed as a .czann (once per session).

    PyTorch entries are packed **directly from the module** by ``czregistry.pack`` (the torch plugin's model
    source: NHWC wrapper, TorchScript exporter, opset 18, dynamic H/W, ``softmax`` post layer for logits),
    with the tile from ``InputShape``; Keras entries are exported by tf2onnx as before (some need a fixed
    batch of 1, which only a hand export gives). ``pack`` checks parity with the module; the full
    validation is the ``reports`` fixture's, so pack validates statically here.
    """
    import czregistry
    from czregistry.package import write_package

    root = tmp_path_factory.mktemp("corpus")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            entry = CORPUS[name]
            if name.startswith("monai-"):
                pytest.importorskip("monai", reason="the MONAI corpus entries need monai (requirements/torch.txt)")
            path = root / f"{name}.czann"
            if entry.framework == "torch" and not entry.fixed_size:
                result = czregistry.pack(entry.build(), metadata(entry), path,
                                         postprocessing=["softmax"] if entry.post == "softmax" else [],
                                         validate_options=ValidateOptions(static=True))
                assert result.parity_max_abs_diff is not None and result.parity_max_abs_diff <= TOL
            else:
                write_package(path, metadata(entry), export_onnx(entry))
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def reports(corpus: Callable[[str], Path]) -> Callable[[str], Report]:
    """Full validation of each entry, once per session (the expensive part)."""
    done: dict[str, Report] = {}

    def get(name: str) -> Report:
        if name not in done:
            # A generous probe budget: the tests check verdicts, not speed (benchmarks/validate_full.py does),
            # and a shared CI machine must not turn a slow probe into a partial measurement.
            done[name] = validate(corpus(name), ValidateOptions(time_budget=600))
        return done[name]

    return get


def _findings(report: Report, severity: Severity) -> set[str]:
    return {f.check for f in report.findings if f.severity is severity}


def tiled_minus_whole(path: Path, shape: tuple[int, ...], *, tile: tuple[int, ...], border: int,
                      stride: tuple[int, ...], seed: int = 0) -> float:
    """Largest |tiled - whole| on a random image: the runner's tiling (stride grid, ``border`` px dropped at
    inner tile edges) against one prediction of the whole image (reflected out as the runner pads it)."""
    from czregistry.metadata import ModelInfo
    from czregistry.package import open_package
    from czregistry.run.pipeline import predict_image
    from czregistry.run.plan import ModelGeometry, RunOptions
    from czregistry.run.tiling import reflect_indices
    from czregistry.selection import load_session

    package = open_package(path)
    info = ModelInfo.from_package(package)
    channels = info.input_channels or 1
    img = np.random.default_rng(seed).random((*shape, channels), dtype=np.float32)
    with load_session(package, None, "cpu") as session:
        geometry = ModelGeometry(stride, (border,) * len(shape), "test")
        out, grid = predict_image(session, info, img, RunOptions(tile=tile, border=border, batch_size=2),
                                  geometry=geometry)
        idx = [reflect_indices(0, p, n) for p, n in zip(grid.padded_shape, shape)]
        whole = session.predict_batch(img[np.ix_(*idx, np.arange(channels))][None])[0]
    whole = whole[tuple(slice(0, n) for n in shape)]
    assert min(grid.border) >= min(border, min((t - s) // 2 for t, s in zip(tile, stride)))
    return float(np.abs(out.astype(np.float64) - whole.astype(np.float64)).max())


# What each architecture's measured behaviour supports. halo: (low, high) per axis for exact halos.
LOCAL = {
    "smp-unet-resnet18": {"stride": 32, "halo": (200, 300), "warnings": {"model.receptive_field.border"},
        "check_tile": (576, 576), "check_shape": (576, 1152)},
    "smp-linknet-resnet18": {"stride": 32, "halo": (60, 140), "warnings": {"model.receptive_field.border"},
        "check_tile": (352, 352), "check_shape": (352, 1024)},
    "keras-encoder-decoder": {"stride": 2, "halo": (3, 8), "warnings": set(),
        "check_tile": (128, 128), "check_shape": (128, 300)},
    "keras-encoder-decoder-skip": {"stride": 2, "halo": (3, 8), "warnings": set(),
        "check_tile": (128, 128), "check_shape": (128, 300)},
    "care-unet": {"stride": 4, "halo": (12, 24), "warnings": set(),
        "check_tile": (256, 256), "check_shape": (256, 600)},
    "dilated-context": {"stride": 1, "halo": (25, 34), "warnings": {"model.receptive_field.border"},
        "check_tile": (128, 128), "check_shape": (128, 400)},
    "unet3d": {"stride": 4, "halo": (6, 14), "warnings": {"model.receptive_field.border"},
        "check_tile": (32, 64, 64), "check_shape": (32, 64, 160)},
    # ConvNeXt-atto encoder: LayerNorm over each pixel's channels is local (not a per-image statistic)
    "smp-unet-convnext_atto": {"stride": 32, "halo": (40, 90), "warnings": set(),
        "check_tile": (256, 256), "check_shape": (256, 640)},
    # MONAI's BasicUNet with BatchNorm (4 poolings; at 128 px the probe pins the halo)
    "monai-basicunet": {"stride": 4, "halo": (4, 10), "warnings": set(),
        "check_tile": (128, 128), "check_shape": (128, 320)},  # whole image on its size step of 16
}
HEAVY = {"smp-unet-resnet18", "smp-linknet-resnet18", "smp-unet-convnext_atto"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in LOCAL])
def test_fully_convolutional_networks_are_valid_and_tile_exactly_at_the_measured_halo(
        name: str, corpus: Callable[[str], Path], reports: Callable[[str], Report]) -> None:
    want: dict[str, Any] = LOCAL[name]
    report = reports(name)
    m = report.measurements
    assert report.valid and not report.errors, report.to_json()
    assert _findings(report, Severity.WARNING) == want["warnings"], report.to_json()
    assert m["global_context"] is False
    nd = len(want["check_tile"])
    assert m["stride"] == [want["stride"]] * nd
    lo, hi = want["halo"]
    assert all(lo <= h <= hi for h in m["halo"]), m["halo"]
    assert m["min_overlap_exact"] == [2 * h for h in m["halo"]]
    # The claim, checked: tiles on the stride grid with a border of the measured halo equal the whole image.
    halo = max(m["halo"])
    err = tiled_minus_whole(corpus(name), want["check_shape"], tile=want["check_tile"], border=halo,
                            stride=(want["stride"],) * nd)
    assert err <= nd * TOL * max(1.0, m["output"]["max"] - m["output"]["min"]), err
    if "model.receptive_field.border" in want["warnings"]:
        # ... and the warning's claim: at the declared border (MinOverlap / 2) the tiles show seams.
        # Same geometry as the validator's measurement: the package's tile, two tiles per axis at that overlap.
        entry = CORPUS[name]
        declared = entry.min_overlap[0] // 2
        two_tiles = tuple(2 * t - o for t, o in zip(entry.tile, entry.min_overlap))
        seams = tiled_minus_whole(corpus(name), two_tiles, tile=entry.tile, border=declared,
                                  stride=(want["stride"],) * nd)
        assert seams > TOL, seams
        assert m["seam_error"] > TOL  # the validator measured seams at the declared overlap too ...
        assert 0.2 <= seams / m["seam_error"] <= 5, (seams, m["seam_error"])  # ... of the size our tiles show


# Global context, with the evidence the probe found and the architecture explains.
GLOBAL = {
    # GroupNorm in the FPN decoder: per-image normalisation.
    "smp-fpn-resnet18": {"severity": Severity.ERROR, "stride": 32},
    # AdaptiveAvgPool2d(1) branches: PAN's feature pyramid attention, DeepLabV3 ASPP's image pooling.
    "smp-pan-resnet18": {"severity": Severity.ERROR, "stride": 32},
    "smp-deeplabv3plus-resnet18": {"severity": None, "stride": 16},
    # MONAI UNet with InstanceNorm: per-image (per-tile) statistics in every block.
    "monai-unet-instancenorm": {"severity": Severity.ERROR, "stride": 4},
    # SegFormer (MiT-b0): efficient self-attention over the whole tile (keys and values pooled by 8 to 1/32).
    "smp-segformer-mit_b0": {"severity": Severity.ERROR, "stride": 32},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GLOBAL))
def test_global_context_is_named_only_with_evidence_and_no_overlap_removes_it(
        name: str, corpus: Callable[[str], Path], reports: Callable[[str], Report]) -> None:
    want = GLOBAL[name]
    report = reports(name)
    m = report.measurements
    assert m["global_context"] is True and m["probe"]["global_evidence"], report.to_json()
    finding = next(f for f in report.findings if f.check == "model.invariance.equivariance")
    assert "global context" in finding.message and "evidence:" in finding.message
    strength = m["global_strength"]
    if want["severity"] is not None:
        assert finding.severity is want["severity"]
    else:  # the severity follows the measured strength
        expected = Severity.ERROR if strength is None or strength >= 1e-2 else Severity.WARNING
        assert finding.severity is expected
    # The claim, checked: even the widest border a 256 tile allows leaves tiles unequal to the whole image.
    stride = want["stride"]
    border = (256 - stride) // 2
    err = tiled_minus_whole(corpus(name), (256, 768), tile=(256, 256), border=border, stride=(stride, stride))
    assert err > TOL, err


@pytest.mark.slow
def test_a_halo_wider_than_the_tile_is_a_warning_with_the_overlap_and_tile_it_needs(
        reports: Callable[[str], Report]) -> None:
    """smp U-Net at InputShape 256, MinOverlap 128 (the report that started this): valid, with the needed
    overlap, which cannot fit a 256 tile, so the hint names the tile size that would."""
    report = reports("smp-unet-resnet18")
    border = next(f for f in report.findings if f.check == "model.receptive_field.border")
    assert border.severity is Severity.WARNING
    assert "declared border [64, 64]" in border.message and "tiles will show seams" in border.message
    assert border.hint is not None and "does not fit the [256, 256] tile" in border.hint
    need = [2 * h for h in report.measurements["halo"]]
    assert f"MinOverlap {need}" in border.hint and "pack with a tile of at least" in border.hint


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smp-unetplusplus-resnet18", "smp-unet-efficientnet-b0"])
def test_more_encoders_and_decoders_are_not_called_global(name: str, reports: Callable[[str], Report]) -> None:
    report = reports(name)
    m = report.measurements
    assert report.valid, report.to_json()
    assert m["global_context"] is False
    assert all(h is not None for h in m["halo"]) or all(b is not None for b in m["halo_bound"])


def test_a_classifier_is_valid_and_not_probed_spatially(reports: Callable[[str], Report]) -> None:
    report = reports("resnet18-classifier")
    assert report.valid and not report.warnings, report.to_json()
    assert {f.check for f in report.findings if "spatial checks skipped" in f.message} == {
        "model.invariance", "model.receptive_field"}


# -- fixed batch 1 (ZEISS's LiveDenoise models are exported that way) ---------------------------------------


@pytest.fixture
def batch1(corpus: Callable[[str], Path]) -> Iterator[Path]:
    path = corpus("care-unet-batch1")
    from czregistry.package import open_package
    from czregistry.selection import load_session

    with load_session(open_package(path)) as session:
        assert session.signature.inputs[0].shape[0] == 1  # the export really fixed the batch
    yield path


def test_fixed_batch_model_runs_and_smokes_with_defaults(batch1: Path, tmp_path: Path,
                                                          reports: Callable[[str], Report]) -> None:
    import tifffile

    from czregistry.cli import main as cli

    img = (np.random.default_rng(3).random((700, 900)) * 65535).astype(np.uint16)
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, img)
    out = tmp_path / "out.ome.tiff"
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(batch1), str(src), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "single-tile calls" in result.output  # batches of 4 ran as one tile per call, and it says so
    tiled = tifffile.imread(out).astype(np.float64).reshape(700, 900)
    # exact against whole-image inference away from the image edge (the runner reflects at the edges)
    from czregistry.package import open_package
    from czregistry.selection import load_session

    with load_session(open_package(batch1)) as session:
        x = (img.astype(np.float32) / 65535.0)[None, :, :, None]
        whole = session.predict_batch(x[:, :696, :896])[0, ..., 0].astype(np.float64)
    halo = max(reports("care-unet-batch1").measurements["halo"])
    inner = (slice(halo, 696 - halo), slice(halo, 896 - halo))
    assert np.abs(tiled[:696, :896][inner] - whole[inner]).max() <= 2 * TOL
    smoke = runner.invoke(cli, ["smoke", str(batch1), "--json"])
    assert smoke.exit_code == 0, smoke.output
    assert '"valid": true' in smoke.output


def test_publish_smoke_accepts_a_fixed_batch_model(batch1: Path) -> None:
    from czregistry.cli import main as cli

    result = CliRunner().invoke(cli, ["publish", str(batch1), "--name", "denoise", "--version", "1.0.0", "--smoke",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert '"status": "published"' in result.output


def test_a_batch_fixed_above_one_is_refused_clearly(tmp_path: Path, corpus: Callable[[str], Path]) -> None:
    import onnx

    from czregistry.errors import RunError
    from czregistry.metadata import ModelInfo
    from czregistry.package import open_package, write_package
    from czregistry.run.pipeline import predict_image
    from czregistry.selection import load_session

    src = open_package(corpus("care-unet-batch1"))
    model = onnx.load_model_from_string(src.read_model_bytes())
    for t in (*model.graph.input, *model.graph.output):
        t.type.tensor_type.shape.dim[0].dim_value = 4
    path = tmp_path / "b4.czann"
    write_package(path, src.metadata or {}, model.SerializeToString())
    report = validate(path, ValidateOptions())
    assert "model.signature.batch" in {f.check for f in report.errors}
    package = open_package(path)
    with load_session(package) as session, pytest.raises(RunError, match="batch dimension is fixed at 4"):
        predict_image(session, ModelInfo.from_package(package), np.zeros((64, 64, 1), np.float32))


# -- off-step sizes: a plain encoder-decoder accepts 63 px and gives 62 -------------------------------------


def test_encoder_decoder_packs_with_a_tile_reset_and_validates_without_an_output_size_warning(
        tmp_path: Path, reports: Callable[[str], Report]) -> None:
    from czregistry.cli import main as cli

    report = reports("keras-encoder-decoder")
    assert "model.invariance.output_size" not in {f.check for f in report.findings}
    offstep = report.measurements["probe"]["offstep_sizes"]
    assert any(p["size"] == [127, 127] and p["output"] == [126, 126] for p in offstep), offstep
    model = CORPUS["keras-encoder-decoder"].build()
    src = tmp_path / "encdec.keras"
    model.save(src)
    out = tmp_path / "encdec.czann"
    result = CliRunner().invoke(cli, ["pack", str(src), "-o", str(out), "--type", "MultiClassSemanticSegmentation",
                                      "--classes", "background,cells", "--min-overlap", "10", "--tile", "128", "128"])
    assert result.exit_code == 0, result.output
    packed = validate(out, ValidateOptions())
    assert packed.valid and "model.invariance.output_size" not in {f.check for f in packed.findings}
    assert packed.measurements["tile"] == [128, 128]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if CORPUS[n].slow or n in HEAVY else n
                                  for n in CORPUS if n != "care-unet-1024-batch1"])
def test_every_corpus_network_passes_the_static_graph_audit(name: str, corpus: Callable[[str], Path]) -> None:
    """No false alarm on the networks people ship (packed from torch modules by czregistry.pack, or exported
    by tf2onnx): the audit must stay silent on real graphs, and see them (ops it counts, standard only)."""
    from czregistry.audit import audit_package
    from czregistry.package import open_package

    audit = audit_package(open_package(corpus(name)))
    assert audit.clean, audit.summary()
    assert sum(audit.ops.values()) >= 10 and "Conv" in audit.ops, dict(audit.ops)
    assert not [op for op in audit.ops if "::" in op], dict(audit.ops)  # standard domains only


# --- issue 23: validate and smoke agree on seams, fixed-size graphs measured as ZEN tiles ---

#: Corpus entries cheap enough to validate *and* smoke here, dynamic and fixed-size: seams expected or not.
AGREE = {"keras-encoder-decoder": False, "care-unet": False, "dilated-context": True,
         "care-unet-fixed": False, "dilated-context-fixed": True, "smp-unet-resnet18-fixed128": True,
         "smp-linknet-resnet18-fixed": True}
_SEAM_FINDINGS = {"model.receptive_field.border", "model.receptive_field.seams"}


@pytest.mark.parametrize("name", list(AGREE))
def test_validate_and_smoke_agree_on_seams(name: str, corpus: Callable[[str], Path],
                                           reports: Callable[[str], Report]) -> None:
    """The two never disagree on the same package: validate warns about seams exactly when smoke fails on them,
    and the seam errors they measure (on different images, at the declared overlap) are within 2x."""
    from czregistry.run.smoke import smoke_test

    report = reports(name)
    smoke = smoke_test(corpus(name), device="cpu")
    v_seams = bool(_SEAM_FINDINGS & _findings(report, Severity.WARNING))
    s_seams = "smoke.seams" in _findings(smoke, Severity.ERROR)
    assert (v_seams, s_seams) == (AGREE[name], AGREE[name]), (report.to_json(), smoke.to_json())
    assert report.measurements["seam_error"] is not None and smoke.measurements["smoke.seam_error"] is not None
    if AGREE[name]:
        v, s = report.measurements["seam_error"], smoke.measurements["smoke.seam_error"]
        assert 0.5 <= v / s <= 2, (v, s)


def test_fixed_tile_with_a_halo_wider_than_it_warns_at_the_border_with_a_tile_hint(
        reports: Callable[[str], Report]) -> None:
    """The README's PyTorch example (smp U-Net fixed at 128, MinOverlap 64): seams measured with real fixed-size
    tiles, the halo as a lower bound, a warning (not info) for an effect of a third of the output range, and
    only hints that can help a fixed graph (a larger tile, never --max-probe-size)."""
    report = reports("smp-unet-resnet18-fixed128")
    border = next(f for f in report.findings if f.check == "model.receptive_field.border")
    assert border.severity is Severity.WARNING
    assert border.message.startswith("fixed tile [128, 128]: at the declared overlap [64, 64]")
    assert "tiles will show seams; the halo is at least [64, 64] px (a lower bound" in border.message
    assert border.hint is not None and "re-pack from the source with a larger tile (czreg pack --tile" in border.hint
    eq = next(f for f in report.findings if f.check == "model.invariance.equivariance")
    assert eq.severity is Severity.WARNING and "not shown translation-equivariant" in eq.message
    text = " ".join(f"{f.message} {f.hint or ''}" for f in report.findings) + " ".join(
        report.measurements["probe"]["notes"])
    assert "max-probe-size" not in text
    assert report.measurements["seam_method"] == "tiles-vs-centre-window"
    assert report.measurements["seam_error_rel"] > 0.05


@pytest.mark.parametrize(("name", "need_range"), [("dilated-context-fixed", (50, 68)),
                                                  pytest.param("smp-linknet-resnet18-fixed", (120, 250),
                                                               marks=pytest.mark.slow)])
def test_the_recommended_overlap_of_a_fixed_tile_validates_clean_and_smokes_pass(
        name: str, need_range: tuple[int, int], tmp_path: Path, corpus: Callable[[str], Path],
        reports: Callable[[str], Report]) -> None:
    """Fixed-size graphs whose halo fits their tile (the dilated network: halo 32 in a 128 tile, MinOverlap 16; smp's
    Linknet fixed at 256, MinOverlap 128): validate's hint names the overlap that removes the seams; declared, it
    validates without a border warning and smoke passes. Both judge by one limit (``probing.seam_limit``): with
    two, Linknet at its recommended overlap validated clean (1.6e-4) and failed its smoke test (1.4e-4)."""
    import json
    import re
    import zipfile

    from czregistry.package import open_package, write_package
    from czregistry.run.smoke import smoke_test

    report = reports(name)
    border = next(f for f in report.findings if f.check == "model.receptive_field.border")
    assert border.hint is not None
    match = re.match(r"set MinOverlap to \[(\d+), (\d+)\]", border.hint)
    assert match, border.hint
    need = [int(match.group(1)), int(match.group(2))]
    assert need_range[0] <= need[0] <= need_range[1], need
    assert report.measurements.get("min_overlap_exact") in (need, None)
    assert report.measurements.get("min_overlap_needed") in (need, None)
    src = open_package(corpus(name))
    meta = json.loads(zipfile.ZipFile(src.path).read("model.json"))
    meta["MinOverlap"] = need
    fixed = write_package(tmp_path / "fixed.czann", meta, src.read_model_bytes())
    again = validate(fixed, ValidateOptions(time_budget=600))
    assert again.valid and not again.warnings, again.to_json()
    smoke = smoke_test(fixed, device="cpu")
    assert smoke.valid, smoke.to_json()
    assert smoke.measurements["smoke.seam_error"] <= 2 * TOL  # probing.seam_limit: TOL per spatial axis


def test_unetr_runs_only_at_its_trained_size_and_its_attention_is_global(
        corpus: Callable[[str], Path], reports: Callable[[str], Report]) -> None:
    """MONAI's UNETR, exported (as users do) with dynamic H/W: its position embeddings were learnt at img_size 64,
    so only 64x64 runs, and validate names that size; its self-attention sees the whole tile (global context).
    Checked by running it: two tiles shifted by 16 px differ everywhere in their overlap, even at its centre."""
    from czregistry.package import open_package
    from czregistry.selection import load_session

    report = reports("monai-unetr")
    warn = next(f for f in report.findings if f.check == "model.invariance.fixed_size")
    assert warn.severity is Severity.WARNING and "runs only on [64, 64]" in warn.message
    m = report.measurements
    assert m["fixed_size"] == [64, 64] and m["global_context"] is True, report.to_json()
    assert "model.invariance.equivariance" in _findings(report, Severity.ERROR)
    img = np.random.default_rng(0).random((1, 64, 80, 1), dtype=np.float32)
    with load_session(open_package(corpus("monai-unetr")), None, "cpu") as session:
        a = session.predict(np.ascontiguousarray(img[:, :, :64]))[0]
        b = session.predict(np.ascontiguousarray(img[:, :, 16:]))[0]
    centre = np.abs(a[24:40, 32:48].astype(np.float64) - b[24:40, 16:32].astype(np.float64)).max()
    assert centre > 10 * TOL, centre


def _tiles_minus_whole(path: Path, tile: tuple[int, ...], overlap: tuple[int, ...], stride: int, n: int = 2) -> float:
    """``n`` tiles per axis overlapping by exactly ``overlap`` (an image of ``n * tile - (n - 1) * overlap``),
    stitched at the middle of each overlap as the host does: every stitched pixel is at least ``overlap / 2`` px
    from an inner tile edge, and the pixels at the cuts exactly that far."""
    shape = tuple(n * t - (n - 1) * o for t, o in zip(tile, overlap))
    return tiled_minus_whole(path, shape, tile=tile, border=min(overlap) // 2, stride=(stride,) * len(tile))


@pytest.mark.slow
def test_mobilenet_unet_stride_and_halo_are_the_same_on_both_axes_and_tile_exactly(
        corpus: Callable[[str], Path], reports: Callable[[str], Report]) -> None:
    """smp U-Net with a MobileNetV2 encoder (random weights: a weak deep path, output range ~0.05). A one-pixel
    shift changes it by ~1e-2, a 4-pixel shift by 1.4e-4 (the stride-8 and deeper levels' phase), just above the
    tolerance: the stride search once took shift 4 for the stride on one axis because that error dipped below the
    tolerance at the 256-pixel window's centre only (halo 125 = half the window; ``probing.EXACT_MARGIN``). The
    network is symmetric in H and W, and so must be its figures; checked by tiling at the recommended overlap
    (seamless) and at one well below it (seams)."""
    report = reports("smp-unet-mobilenet_v2")
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["global_context"] is False and m["stride"] == [8, 8], m["stride"]
    assert all(14 <= h <= 24 for h in m["halo"]), m["halo"]
    assert abs(m["halo"][0] - m["halo"][1]) <= 4
    assert m["min_overlap_exact_seam_error"] <= 2 * TOL
    path = corpus("smp-unet-mobilenet_v2")
    need = tuple(-(-2 * h // 8) * 8 for h in m["halo"])  # the recommended MinOverlap on the stride grid
    assert _tiles_minus_whole(path, (256, 256), need, 8) <= 2 * TOL
    assert _tiles_minus_whole(path, (256, 256), (16, 16), 8) > TOL  # 8 px from the cut: seams


@pytest.mark.slow
def test_3d_care_unet_tiles_exactly_at_its_declared_overlap_and_not_one_voxel_below_the_halo(
        corpus: Callable[[str], Path], reports: Callable[[str], Report]) -> None:
    """The 3D CARE U-Net (tile 16x64x64, MinOverlap 8x16x16): validate measures halo 4/4/5 at stride 1 and calls
    the declared overlap seamless; tiles at that overlap equal whole-volume inference, and tiles whose cut lies one
    voxel inside the halo on every axis do not (the halo is tight, not merely sufficient)."""
    report = reports("care-unet3d")
    m = report.measurements
    assert report.valid and not report.warnings, report.to_json()
    assert m["stride"] == [1, 1, 1] and all(3 <= h <= 6 for h in m["halo"]), m
    assert m["seam_error"] <= 3 * TOL
    entry = CORPUS["care-unet3d"]
    path = corpus("care-unet3d")
    declared = _tiles_minus_whole(path, entry.tile, entry.min_overlap, 1)
    assert declared <= 3 * TOL, declared
    # Three smaller tiles per axis keep the volume on the graph's size step (4) with overlaps of 2 (halo - 1).
    below = _tiles_minus_whole(path, (16, 32, 32), tuple(2 * (h - 1) for h in m["halo"]), 1, n=3)
    assert below > 3 * TOL, below


def test_swinunetr_runs_on_some_sizes_only_and_its_context_is_global(
        corpus: Callable[[str], Path], reports: Callable[[str], Report]) -> None:
    """MONAI's SwinUNETR (2D, defaults: patch 2, window 7, instance norm; exported with dynamic H/W). Its shifted
    windows are padded and masked with shapes traced at 64x64: the graph runs on multiples of 32 up to a few windows
    (64x128 runs, 64x256 does not), so the probe stops growing there and reads its largest window. Instance norm
    (per-tile statistics in its convolutional blocks) and the last stage's attention window (at 64 px its 4x4 tokens
    of 16 px: the whole tile) make every output depend on the whole tile: global context. Checked by running it: two
    tiles 32 px apart (on its size step) differ at the centre of their overlap, and blanking one end of a window
    changes the other end."""
    from czregistry.package import open_package
    from czregistry.selection import load_session

    report = reports("monai-swinunetr")
    m = report.measurements
    assert m["step"] == [32, 32] and m["accepts_other_sizes"] is True, report.to_json()
    assert m["global_context"] is True and "model.invariance.equivariance" in _findings(report, Severity.ERROR)
    assert any("refused the [64, 256] probe window" in n for n in m["probe"]["notes"]), m["probe"]["notes"]
    assert any("does not fall with distance" in e for e in m["probe"]["global_evidence"])
    img = np.random.default_rng(0).random((1, 64, 96, 1), dtype=np.float32)
    with load_session(open_package(corpus("monai-swinunetr")), None, "cpu") as session:
        a = session.predict(np.ascontiguousarray(img[:, :, :64]))[0].astype(np.float64)
        b = session.predict(np.ascontiguousarray(img[:, :, 32:]))[0].astype(np.float64)
        blank = img[:, :, :64].copy()
        blank[:, :, 48:] = 0.0
        c = session.predict(blank)[0].astype(np.float64)
    centre = np.abs(a[24:40, 40:56] - b[24:40, 8:24]).max()  # 8 px and more from either tile's edge
    assert centre > 10 * TOL, centre
    far = np.abs(a[:, :8] - c[:, :8]).max()  # 40 px and more from the blanked quarter
    assert far > 10 * TOL, far
