"""The README's PyTorch example, run as a new user would (issue 23): a traced ``smp.Unet("resnet18")`` packed by
``czreg pack net.pt ... --tile 768 768 --min-overlap 64`` (a graph fixed at 768 x 768, as czmodel 6.2's PyTorch
export and ZEISS's own models are), and the same network packed from the module by ``czregistry.pack``.

What the README promises, checked here with the real commands: ``validate`` warns about seams at MinOverlap 64
with a figure within 2x of the seam error ``smoke`` measures by tiling, its hint names the MinOverlap that removes
them, and a package re-packed with that MinOverlap validates without a warning and smokes PASS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from czregistry.cli import main

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")

pytestmark = pytest.mark.slow

TILE = 768
PACK = ["--type", "SingleClassSemanticSegmentation", "--classes", "background,nucleus"]


def _net() -> Any:
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=2).eval()  # the README's line


def _cli(*args: str | Path, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code in ok, res.output
    try:
        out = json.loads(res.stdout)
    except ValueError:
        raise AssertionError(f"{args[0]} --json printed no JSON: {res.output[-2000:]}") from None
    one: dict[str, Any] = out[0] if isinstance(out, list) else out  # validate --json lists one per package
    return one


def _border(report: dict[str, Any]) -> dict[str, Any] | None:
    return next((f for f in report["findings"] if f["check"] == "model.receptive_field.border"), None)


def _recommended(report: dict[str, Any]) -> str:
    border = _border(report)
    assert border is not None and border["severity"] == "warning", report
    match = re.match(r"set MinOverlap to \[(\d+), (\d+)\]", border["hint"] or "")
    assert match, border
    return f"{match.group(1)},{match.group(2)}"


def _validate_then_smoke(package: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    report = _cli("validate", package, "--json", ok=(0,))
    smoke = _cli("smoke", package, "--device", "cpu", "--json", ok=(0, 1))
    return report, smoke


def _agree_then_fix(tmp_path: Path, package: Path, repack: Any) -> None:
    """At MinOverlap 64: a seam warning whose figure is within 2x of smoke's, smoke FAILs; at the recommended
    MinOverlap: no warning at all, smoke PASSes."""
    report, smoke = _validate_then_smoke(package)
    assert report["valid"] and not smoke["valid"], (report, smoke)
    v, s = report["measurements"]["seam_error"], smoke["measurements"]["smoke.seam_error"]
    assert s > 0.05 and 0.5 <= v / s <= 2, (v, s)
    want = _recommended(report)
    fixed = repack(want)
    again, smoke2 = _validate_then_smoke(fixed)
    assert again["valid"] and not [f for f in again["findings"] if f["severity"] != "info"], again
    assert smoke2["valid"], smoke2
    assert smoke2["measurements"]["smoke.seam_error"] <= 1e-4 * 2


def test_readme_cli_example_warns_like_smoke_and_the_recommended_overlap_fixes_it(tmp_path: Path) -> None:
    pt = tmp_path / "net.pt"
    torch.jit.trace(_net(), torch.zeros(1, 3, TILE, TILE)).save(str(pt))

    def pack(overlap: str, name: str = "nuclei.czann") -> Path:
        out = tmp_path / name
        _cli("pack", pt, "-o", out, *PACK, "--min-overlap", overlap, "--tile", str(TILE), str(TILE),
             "--post", "softmax", "--json")
        return out

    _agree_then_fix(tmp_path, pack("64"), lambda want: pack(want, "nuclei-fixed.czann"))


def test_readme_python_example_warns_like_smoke_and_the_recommended_overlap_fixes_it(tmp_path: Path) -> None:
    import czregistry

    net = _net()

    def pack(overlap: list[int], name: str) -> Path:
        out = tmp_path / name
        czregistry.pack(net, {"Type": "SingleClassSemanticSegmentation", "Classes": ["background", "nucleus"],
                              "MinOverlap": overlap}, out, spatial_dims=(TILE, TILE),
                        preprocessing=["normalize:mean=0.5,std=0.25"], postprocessing=["softmax"])
        return out

    _agree_then_fix(tmp_path, pack([64, 64], "nuclei.czann"),
                    lambda want: pack([int(v) for v in want.split(",")], "nuclei-fixed.czann"))
