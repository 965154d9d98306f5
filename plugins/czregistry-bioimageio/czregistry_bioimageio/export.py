"""CZANN -> bioimage.io model package (format 0.5): ``czreg export-bioimageio x.czann -o model.zip``.

Why it is built this way:

- **The CZANN's own graph is the weights.** bioimage.io 0.5 lets a tensor's axes come in any order, so the
  NHWC / NDHWC ONNX model goes in unchanged as ``onnx`` weights (axes batch, [z,] y, x, channel); nothing is
  converted, so nothing can drift.
- **Proven before it is written.** The package is validated by czregistry first (an invalid CZANN is not
  exported) and that report goes into the documentation; the test tensors are our runner's prediction on a
  seeded input at the tile size; the finished description must pass bioimageio.spec's own validation,
  and the zip is written atomically (nothing at ``-o`` on any failure).
- **Halo as measured.** The output axes carry the halo the invariance probe measured (``halo`` in the
  validation report), else ``MinOverlap / 2``.
- **Licence and authors are required by bioimage.io; CZANN has no field for them.** They come from
  ``--license`` / ``--author``, else from the ``License:`` / ``Authors:`` lines of the package's license
  member (what the bioimage.io import writes); missing ones are refused with that hint.
- ``config.czregistry`` keeps the CZANN fields bioimage.io has no place for (Type, Classes, MinOverlap,
  Scaling, Id), so CZANN -> bioimage.io -> CZANN gives the same metadata.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from czregistry.errors import PackError, UsageError, first_line

__all__ = ["ExportResult", "export_bioimageio"]

_SPDX = re.compile(r"^[A-Za-z0-9.+-]{2,64}$")


@dataclass
class ExportResult:
    path: Path
    name: str
    license: str
    authors: list[str]
    halo: list[int]
    notes: list[str] = field(default_factory=list)


def _license_member_fields(text: str | None) -> tuple[str | None, list[str]]:
    if not text:
        return None, []
    lic = re.search(r"^License:\s*(\S+)\s*$", text, re.MULTILINE)
    authors = re.search(r"^Authors:\s*(.+)$", text, re.MULTILINE)
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    spdx = lic.group(1) if lic else (first if _SPDX.match(first) else None)
    return spdx, [a.strip() for a in authors.group(1).split(",") if a.strip()] if authors else []


def _citations(text: str | None) -> list[tuple[str, str]]:
    """``Cite: TEXT doi:DOI`` lines of the license member (what the bioimage.io import writes)."""
    found = re.findall(r"^Cite:\s*(.+?)\s+doi:(10\.\S+)\s*$", text or "", re.MULTILINE)
    return [(str(t), str(d)) for t, d in found]


def _cover(x: Any, y: Any, path: Path) -> None:
    """input | prediction, first channel each (3D: the middle slice), scaled to 0..255, as a 2:1 PNG."""
    import numpy as np
    from PIL import Image

    def plane(a: Any) -> Any:
        a = a[0]
        if a.ndim == 4:
            a = a[a.shape[0] // 2]
        a = a[..., 0].astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        return ((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).astype(np.uint8)

    Image.fromarray(np.concatenate([plane(x), plane(y)], axis=1)).save(path)


def export_bioimageio(package_path: Path, output: Path, *, license_id: str | None = None,
                      authors: list[str] | None = None, force: bool = False, seed: int = 0) -> ExportResult:
    """Write ``package_path`` (a valid ONNX ``.czann``) as a bioimage.io 0.5 model zip at ``output``."""
    import numpy as np

    from czregistry.package import atomic_output, check_overwrite, open_package
    from czregistry.progress import step
    from czregistry.report import render_markdown
    from czregistry.selection import load_session
    from czregistry.validate import validate

    from ._compat import ensure_ready

    if output.suffix.lower() != ".zip":
        raise UsageError(f"the bioimage.io package {output.name} must end in .zip")
    check_overwrite(output, force=force)
    package = open_package(package_path)
    if package.kind != "czann" or package.model_format != "onnx":
        what = ("a legacy .czmodel package" if package.kind != "czann"
                else f"a .czann with a {package.model_format} model")
        raise UsageError(f"{package_path.name} is {what}; only .czann packages with an ONNX model export to "
                         "bioimage.io", hint="repack it as .czann (czreg pack ... -o NAME.czann)")
    meta = dict(package.metadata or {})
    spdx, member_authors = _license_member_fields(package.read_license())
    spdx = license_id or spdx
    names = list(authors or member_authors)
    if not spdx:
        raise UsageError(f"{package_path.name} names no license; bioimage.io packages need an SPDX license id",
                         hint="pass --license, e.g. --license MIT (or CC-BY-4.0)")
    if not names:
        raise UsageError(f"{package_path.name} names no authors; bioimage.io packages need at least one",
                         hint="pass --author 'First Last' (repeat it for several)")
    with step("export: validating the package"):
        report = validate(package_path)
    if not report.valid:
        first = report.errors[0] if report.errors else None
        raise UsageError(f"{package_path.name} is not a valid package"
                         + (f" ({first.check}: {first.message})" if first else ""),
                         hint=f"fix it first: czreg validate {package_path}")
    shape = [int(d) for d in meta["InputShape"]]
    out_shape = [int(d) for d in meta["OutputShape"]]
    spatial = shape[:-1]
    if out_shape[:-1] != spatial:
        raise UsageError(f"the output {out_shape} is not an image of the input's size {shape}; bioimage.io "
                         "exports here need an image-to-image model")
    axes_ids = ["z", "y", "x"][-len(spatial):]
    measured = report.measurements.get("halo")
    if isinstance(measured, list) and len(measured) == len(spatial) and all(h is not None for h in measured):
        halo = [int(h) for h in measured]
        halo_from = "measured by the invariance probe"
    else:
        halo = [int(m) // 2 for m in (meta.get("MinOverlap") or [0] * len(spatial))]
        halo_from = "MinOverlap / 2 (the probe measured none)"
    halo = [min(h, (s - 1) // 2) for h, s in zip(halo, spatial)]
    x = np.random.default_rng(seed).random((1, *shape), dtype=np.float32)
    with step("export: predicting the test output"), load_session(package, device="cpu") as session:
        y = session.predict(x).astype(np.float32)

    ensure_ready()
    from bioimageio.spec import InvalidDescr, save_bioimageio_package
    from bioimageio.spec.model import v0_5 as b

    try:
        license_value = b.LicenseId(spdx)
    except Exception:
        raise UsageError(f"'{spdx}' is not an SPDX license id bioimage.io accepts",
                         hint="pass --license with an id from https://spdx.org/licenses/, e.g. MIT or "
                              "CC-BY-4.0") from None
    cite = [b.CiteEntry(text=text, doi=b.Doi(doi)) for text, doi in _citations(package.read_license())]
    with tempfile.TemporaryDirectory(prefix="czreg-export-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "model.onnx").write_bytes(package.read_model_bytes())
        np.save(tmp / "test_input.npy", x)
        np.save(tmp / "test_output.npy", y)
        _cover(x, y, tmp / "cover.png")
        name = str(meta.get("ModelName") or package_path.stem)
        classes = [str(c) for c in meta.get("Classes") or []]
        doc = [f"# {name}", "", f"Exported from the CZANN package `{package_path.name}` by czregistry.", "",
               f"- Type: {meta.get('Type')}", f"- Tile (InputShape): {shape}",
               f"- MinOverlap: {meta.get('MinOverlap')}", f"- Output halo: {halo} ({halo_from})",
               "- Input: float32 in [0, 1], channels last; output: float32 in [0, 1]", "",
               "## czregistry validation report", "", render_markdown(report)]
        (tmp / "README.md").write_text("\n".join(doc) + "\n", encoding="utf-8")
        in_ch: list[str] = [f"c{i}" for i in range(shape[-1])]
        out_ch: list[str] = [re.sub(r"[^A-Za-z0-9_]", "_", c) or f"c{i}" for i, c in enumerate(classes)] \
            if len(classes) == out_shape[-1] else [f"c{i}" for i in range(out_shape[-1])]
        scaling = meta.get("Scaling") or []
        scale = {"x": scaling[0], "y": scaling[1], "z": scaling[2]} if len(scaling) == 3 else \
            ({"x": scaling[0], "y": scaling[1]} if len(scaling) == 2 else {})

        def space_kw(a: str) -> dict[str, Any]:
            return {"unit": "micrometer", "scale": float(scale[a]) * 1e6} if scale.get(a) else {}

        inputs = [b.InputTensorDescr(
            id=b.TensorId("input"), description="raw tile scaled to [0, 1]",
            axes=[b.BatchAxis(), *[b.SpaceInputAxis(id=b.AxisId(a), size=s, **space_kw(a))
                                   for a, s in zip(axes_ids, spatial)],
                  b.ChannelAxis(channel_names=in_ch)],
            test_tensor=b.FileDescr(source=tmp / "test_input.npy"),
            data=b.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))]
        outputs = [b.OutputTensorDescr(
            id=b.TensorId("output"), description=str(meta.get("Type")),
            axes=[b.BatchAxis(), *[b.SpaceOutputAxisWithHalo(
                id=b.AxisId(a), halo=h, size=b.SizeReference(tensor_id=b.TensorId("input"), axis_id=b.AxisId(a)),
                **space_kw(a)) for a, h in zip(axes_ids, halo)],
                  b.ChannelAxis(channel_names=out_ch)],
            test_tensor=b.FileDescr(source=tmp / "test_output.npy"),
            data=b.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))]
        keep = {k: meta[k] for k in ("Type", "Classes", "MinOverlap", "Scaling", "Id") if meta.get(k) is not None}
        try:
            descr = b.ModelDescr(
                name=name, description=f"{meta.get('Type')} model exported from a ZEISS CZANN package",
                authors=[b.Author(name=n) for n in names], license=license_value, cite=cite,
                covers=[b.FileDescr(source=tmp / "cover.png")], documentation=b.FileDescr(source=tmp / "README.md"),
                inputs=inputs, outputs=outputs, tags=["czann", "zeiss"],
                weights=b.WeightsDescr(onnx=b.OnnxWeightsDescr(
                    source=tmp / "model.onnx", opset_version=max(7, _opset(package.read_model_bytes())))),
                config=b.Config(czregistry=keep))  # type: ignore[call-arg]
        except Exception as exc:
            raise PackError(f"bioimageio.spec refuses the description: {_pydantic_line(exc)}",
                            hint="check --license (an SPDX id) and the metadata") from exc
        if isinstance(descr, InvalidDescr) or descr.validation_summary.status == "failed":
            raise PackError(f"bioimageio.spec refuses the description: {descr.validation_summary}")
        built = tmp / "model.zip"
        with step("export: writing the bioimage.io package"):
            save_bioimageio_package(descr, output_path=built)
        with atomic_output(output) as part:
            shutil.copyfile(built, part)
    return ExportResult(output, name, spdx, names, halo, notes=[f"output halo {halo}: {halo_from}"])


def _pydantic_line(exc: Exception) -> str:
    """The first error of a pydantic ``ValidationError`` as ``field: message``, else the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        except Exception:
            pass
    return first_line(exc)


def _opset(data: bytes) -> int:
    from czregistry.onnx.graph import onnx_opset

    return onnx_opset(data) or 18

