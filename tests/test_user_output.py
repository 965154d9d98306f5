"""What a user reads (issue 25): step progress on stderr, summaries whose numbers add up, no Python reprs,
an explicit --tile over a spec's InputShape, and install hints that name the command.

Models are a tiny fully convolutional ONNX graph built here (no TensorFlow), so these tests stay fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from czregistry.cli import main
from tests.static_packages import conv_onnx

SEG = ["--type", "SingleClassSemanticSegmentation", "--classes", "background,cell", "--min-overlap", "8"]
#: Python's spellings that must never reach a human-readable output.
REPR = re.compile(r"None|\{'|\['|\[\{|dict\(|NonexNone")


@pytest.fixture()
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "conv.onnx"
    path.write_bytes(conv_onnx())
    return path


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args], catch_exceptions=False)


STEP_LINE = re.compile(r"^(pack|validate|publish): [^\n]+ \.\.\. \d+\.\d s$")


def test_pack_and_validate_log_their_steps_on_stderr(onnx_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CZREG_PROGRESS")
    monkeypatch.setenv("CZREG_PROGRESS_MIN_S", "0")  # log every step, however fast
    pkg = tmp_path / "c.czann"
    res = _cli("pack", str(onnx_file), "-o", str(pkg), "--tile", "64", "64", *SEG, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["valid"] is True  # --json stays clean on stdout
    steps = [line for line in res.stderr.splitlines() if STEP_LINE.match(line)]
    names = [line.rsplit(" ... ", 1)[0] for line in steps]
    for want in ("pack: loading the model", "pack: checking that the model takes 64x64 tiles",
                 "pack: running the source model", "pack: comparing the package with the source",
                 "validate: reading and hashing the package", "validate: loading the model",
                 "validate: model.invariance", "pack: validating the package"):
        assert want in names, res.stderr
    res = _cli("validate", str(pkg))
    assert res.exit_code == 0, res.output
    names = [line.rsplit(" ... ", 1)[0] for line in res.stderr.splitlines() if STEP_LINE.match(line)]
    assert names[:2] == ["validate: reading and hashing the package", "validate: reading the package"]
    assert "validate: model.receptive_field" in names and "\r" not in res.stderr and "\033" not in res.stderr
    assert "VALID" in res.stdout and not STEP_LINE.search(res.stdout)
    # -q silences it; by default (2 s threshold) a fast step stays out of the log
    assert _cli("validate", str(pkg), "-q").stderr == ""
    monkeypatch.delenv("CZREG_PROGRESS_MIN_S")
    assert not any(STEP_LINE.match(x) and float(x.split(" ... ")[1][:-2]) < 2.0
                   for x in _cli("validate", str(pkg)).stderr.splitlines())


def test_publish_logs_its_steps(onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "c.czann"
    assert _cli("pack", str(onnx_file), "-o", str(pkg), "--tile", "64", "64", *SEG).exit_code == 0
    monkeypatch.delenv("CZREG_PROGRESS")
    monkeypatch.setenv("CZREG_PROGRESS_MIN_S", "0")
    res = _cli("publish", str(pkg), "--name", "conv", "--version", "1.0.0")
    assert res.exit_code == 0, res.output
    names = [line.rsplit(" ... ", 1)[0] for line in res.stderr.splitlines() if STEP_LINE.match(line)]
    assert "validate: model.signature" in names and names[-1] == "publish: storing the package"
    assert res.stdout.startswith("Published conv 1.0.0")


def test_terminal_sink_draws_and_clears_one_line() -> None:
    import io
    import time

    from czregistry.cli._progress import TerminalSink
    from czregistry.progress import reporting, step

    out = io.StringIO()
    sink = TerminalSink(out)
    sink.delay = 0.0
    with reporting(sink), step("validate: model.invariance"):
        time.sleep(0.35)
    sink.close()
    text = out.getvalue()
    assert "validate: model.invariance" in text and text.endswith("\r\033[K") and "\n" not in text


def test_explicit_tile_replaces_the_specs_input_shape(onnx_file: Path, tmp_path: Path) -> None:
    meta = {"Type": "SingleClassSemanticSegmentation", "Classes": ["a", "b"], "InputShape": [64, 64, 1],
            "OutputShape": [64, 64, 2], "MinOverlap": [8, 8], "ModelName": "conv"}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ModelMetadata": meta, "ModelPath": onnx_file.name}))
    res = _cli("pack", str(spec), "-o", str(tmp_path / "s.czann"), "--tile", "128", "128")
    assert res.exit_code == 0, res.output
    assert ("Warning: the tile 128x128 replaces InputShape 64x64x1 from the conversion spec spec.json; the "
            "package's InputShape is 128x128x1 and its OutputShape follows the model") in res.stderr.splitlines()
    from czregistry.package import open_package

    got = open_package(tmp_path / "s.czann").metadata
    assert got["InputShape"] == [128, 128, 1] and got["OutputShape"] == [128, 128, 2]
    # without --tile the spec's shape is the model's: no note
    res = _cli("pack", str(spec), "-o", str(tmp_path / "t.czann"))
    assert res.exit_code == 0 and "replaces InputShape" not in res.output


def _consistent(tiles: int, seconds_text: str, rate_text: str) -> None:
    """``tiles / seconds`` equals the printed rate within the rounding of the printed seconds."""
    decimals = len(seconds_text.partition(".")[2])
    s, half = float(seconds_text), 0.5 * 10 ** -decimals
    rate = float(rate_text)
    assert tiles / (s + half) - 0.05 <= rate <= tiles / max(s - half, 1e-9) + 0.05, (tiles, seconds_text, rate)


def test_run_summary_numbers_add_up(onnx_file: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "c.czann"
    assert _cli("pack", str(onnx_file), "-o", str(pkg), "--tile", "64", "64", *SEG).exit_code == 0
    np.save(tmp_path / "a.npy", np.random.default_rng(1).random((300, 280), dtype=np.float32))
    res = _cli("run", str(pkg), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.ome.tiff"), "-q")
    assert res.exit_code == 0, res.output
    first, second = res.stdout.splitlines()[:2]
    tiles = int(re.search(r"from (\d+) tiles on cpu via onnxruntime$", first).group(1))  # type: ignore[union-attr]
    m = re.fullmatch(r"  (\S+) s wall \(with loading and measuring the model\); tile pipeline (\S+) s "
                     r"\((\S+) tiles/s\); model predict (\S+) s \((\S+) tiles/s\)", second)
    assert m, second
    wall, pipe, pipe_rate, pred, pred_rate = m.groups()
    _consistent(tiles, pipe, pipe_rate)
    _consistent(tiles, pred, pred_rate)
    assert float(pred) <= float(pipe) <= float(wall)
    data = json.loads(_cli("run", str(pkg), str(tmp_path / "a.npy"), "-o", str(tmp_path / "p.ome.tiff"),
                           "--json").stdout)
    # the JSON's rate is tiles / pipeline_seconds, both rounded (seconds to 1 ms, the rate to 0.01)
    _consistent(data["tiles"], f"{data['pipeline_seconds']:.3f}", str(data["tiles_per_second"]))


def test_missing_torch_plugin_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from czregistry.plugins import reset_host

    monkeypatch.setenv("CZREG_PLUGINS", "onnxruntime,tensorflow,example")
    reset_host()
    (tmp_path / "net.pt").write_bytes(b"not really torch")
    res = _cli("pack", str(tmp_path / "net.pt"), "-o", str(tmp_path / "n.czann"))
    assert res.exit_code == 2
    assert res.output.splitlines()[-1] == (
        "Hint: PyTorch models need the czregistry-torch plugin: in the czregistry clone run 'pip install -r "
        "requirements/torch.txt' (CPU-only PyTorch, much smaller: 'pip install -r requirements/torch-cpu.txt')")
    assert not (tmp_path / "n.czann").exists()
    repo = Path(__file__).resolve().parents[1]
    cpu = (repo / "requirements" / "torch-cpu.txt").read_text().splitlines()
    pins = {line.split("==")[0]: line.split("==")[1].split()[0] for line in
            (repo / "requirements" / "torch.txt").read_text().splitlines() if line.startswith("torch")}
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    for name, version in pins.items():  # the same matching pair as torch.txt, as CPU builds
        assert any(line.startswith(f"{name}=={version}+cpu ") for line in cpu), name
    readme = (repo / "README.md").read_text()
    assert "requirements/test-cpu.txt" in readme and "requirements/torch-cpu.txt" in readme


def test_no_python_reprs_in_human_output(onnx_file: Path, tmp_path: Path) -> None:
    """Every command's human-readable output (stdout and stderr) on one package: no None, NonexNone, dict or
    list-of-dict reprs."""
    pkg = tmp_path / "c.czann"
    outputs: dict[str, Result] = {}
    outputs["pack free dims"] = _cli("pack", str(onnx_file), "-o", str(tmp_path / "x.czann"), *SEG)
    outputs["pack"] = _cli("pack", str(onnx_file), "-o", str(pkg), "--tile", "64", "64", *SEG)
    outputs["validate"] = _cli("validate", str(pkg))
    outputs["inspect"] = _cli("inspect", str(pkg))
    outputs["smoke"] = _cli("smoke", str(pkg))
    outputs["publish"] = _cli("publish", str(pkg), "--name", "conv", "--version", "1.0.0")
    outputs["show"] = _cli("show", "conv==1.0.0")
    outputs["history"] = _cli("history", "conv")
    outputs["pull"] = _cli("pull", "conv==1.0.0", "-o", str(tmp_path / "pulled.czann"))
    np.save(tmp_path / "a.npy", np.random.default_rng(1).random((200, 180), dtype=np.float32))
    outputs["run"] = _cli("run", str(pkg), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.ome.tiff"))
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(2)
    for i in range(2):
        np.save(images / f"i{i}.npy", rng.random((96, 96), dtype=np.float32))
        np.save(labels / f"i{i}.npy", (rng.random((96, 96)) > 0.5).astype(np.uint8))
    outputs["evaluate"] = _cli("evaluate", str(pkg), "--images", str(images), "--labels", str(labels), "-q")
    assert outputs["pack free dims"].exit_code == 2
    assert "the model takes any tile size (?x?)" in outputs["pack free dims"].output
    for name, res in outputs.items():
        assert name == "pack free dims" or res.exit_code == 0, (name, res.output)
        hits = [line for line in res.output.splitlines() if REPR.search(line)]
        assert hits == [], (name, hits)
    show = outputs["show"].stdout
    assert "  measured:\n    model:" in show and "    tile:               64x64 (fixed size)" in show
    assert max(len(line) for line in show.splitlines()) < 120


def test_measurement_lines_render_unknowns_in_words() -> None:
    from czregistry.report import measurement_lines

    rows = dict(measurement_lines({"tile": [64, 64], "accepts_other_sizes": True, "step": [None, 4],
                                   "halo": [None, None], "halo_bound": [None, None], "stride": [1, 1],
                                   "global_context": None, "output": {"shape": [64, 64, 2], "min": None}}))
    assert rows == {"tile": "64x64 (other sizes on a step of 1x4)", "stride, halo": "1x1, not measured",
                    "global context": "n/a", "output": "64x64x2, values n/a .. n/a"}
